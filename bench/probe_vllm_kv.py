"""Where does vLLM keep a request's keys and values? A probe for the KV connector that
``kv`` on the vllm engine needs (issue 20): run one prompt through vLLM with a connector
that records the paged KV buffers it is handed, then find the model's own keys and values
(computed by transformers for the same prompt) in them.

    python -m bench.probe_vllm_kv [--model DIR] [--out bench/results/probe_vllm_kv.json]

Prints, per buffer: its shape, dtype and strides, and for the first layer the flat
offsets of K[head, token] and V[head, token] for a few heads and tokens, from which the
layout (which axis is K/V, block, head, position in block) reads off directly. Nothing
here serves requests; it answers the layout question once per vLLM release and backend.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

import torch

try:  # the connector class must import without vllm too (the module is named in a config)
    from vllm.distributed.kv_transfer.kv_connector.v1.base import (KVConnectorBase_V1, KVConnectorMetadata,
                                                                   KVConnectorRole)
except ImportError:  # pragma: no cover
    KVConnectorBase_V1, KVConnectorMetadata, KVConnectorRole = object, object, None

SEEN: dict[str, Any] = {"buffers": {}, "blocks": None}


class ProbeMeta(KVConnectorMetadata):
    def __init__(self, blocks):
        self.blocks = blocks


class ProbeConnector(KVConnectorBase_V1):
    """Loads nothing; remembers the KV buffers and the first request's block ids."""

    def __init__(self, vllm_config, role, kv_cache_config=None):
        super().__init__(vllm_config, role, kv_cache_config)
        self._blocks = None

    # scheduler side
    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        return 0, False

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        if self._blocks is None:
            self._blocks = list(blocks.get_block_ids()[0])

    def build_connector_meta(self, scheduler_output):
        return ProbeMeta(self._blocks)

    def request_finished_all_groups(self, request, block_ids):
        return False, None

    # worker side
    def register_kv_caches(self, kv_caches):
        for name, t in kv_caches.items():
            SEEN["buffers"][name] = {"shape": list(t.shape), "dtype": str(t.dtype), "stride": list(t.stride())}
        SEEN["tensors"] = kv_caches

    def start_load_kv(self, forward_context, **kwargs):
        meta = self._get_connector_metadata()
        if SEEN["blocks"] is None and getattr(meta, "blocks", None):
            SEEN["blocks"] = meta.blocks
        layers = SEEN.setdefault("layers", {})
        for name, layer in forward_context.no_compile_layers.items():
            kv = getattr(layer, "kv_cache", None)
            if kv is not None and name not in layers:
                kv = kv[0] if isinstance(kv, (list, tuple)) else kv
                layers[name] = kv

    def wait_for_layer_load(self, layer_name):
        return

    def save_kv_layer(self, layer_name, kv_layer, attn_metadata, **kwargs):
        SEEN.setdefault("save_shapes", {})[layer_name] = list(kv_layer.shape)

    def wait_for_save(self):
        return


def _find(flat: torch.Tensor, vec: torch.Tensor) -> list[int]:
    """Flat offsets where ``vec`` (D values) starts, contiguous, in ``flat``."""
    d = vec.numel()
    hits = ((flat[: flat.numel() - d + 1] - vec[0]).abs() < 1e-4).nonzero().flatten().tolist()
    return [h for h in hits if torch.allclose(flat[h:h + d], vec, atol=1e-3, rtol=1e-3)][:3]  # fp32 on both sides


def main(argv=None) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from vllm import EngineArgs, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.v1.engine.llm_engine import LLMEngine

    from bench import probe_vllm_kv  # vLLM loads the connector from this module, not from __main__
    from server.modelfiles import resolve_model

    SEEN = probe_vllm_kv.SEEN
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    path = resolve_model(a.model)
    prompt = list(range(100, 140))  # 40 tokens: two and a half 16-token blocks
    cfg = KVTransferConfig(kv_connector="ProbeConnector", kv_connector_module_path="bench.probe_vllm_kv",
                           kv_role="kv_both")
    llm = LLMEngine.from_engine_args(EngineArgs(model=str(path), dtype="float32", enforce_eager=True,
                                                max_model_len=512, kv_transfer_config=cfg, seed=0,
                                                enable_prefix_caching=False))
    llm.add_request("probe", {"prompt_token_ids": prompt}, SamplingParams(max_tokens=1))
    while llm.has_unfinished_requests():
        llm.step()
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        past = hf(torch.tensor([prompt]), use_cache=True).past_key_values
    k0, v0 = past.layers[0].keys[0], past.layers[0].values[0]  # [Hkv, T, D], keys rotated
    first = sorted(SEEN.get("layers", {}))[0] if SEEN.get("layers") else None
    report = {"buffers": {k: v for k, v in list(SEEN["buffers"].items())[:2]}, "n_buffers": len(SEEN["buffers"]),
              "block_ids": SEEN["blocks"], "save_shapes": dict(list(SEEN.get("save_shapes", {}).items())[:1]),
              "first_layer": first, "hf_k_shape": list(k0.shape)}
    if first is not None:
        layer = SEEN["layers"][first]
        report["layer_view_shape"] = list(layer.shape)
        report["layer_view_stride"] = list(layer.stride())
        flat = layer.reshape(-1) if layer.is_contiguous() else layer.contiguous().reshape(-1)
        probes = {}
        for what, t in (("K", k0), ("V", v0)):
            for h in (0, 1):
                for tok in (0, 1, 16, 17):
                    probes[f"{what}[h{h},t{tok}]"] = _find(flat, t[h, tok].float())
        report["offsets"] = probes
        # single elements, for layouts that do not keep a token's D values together (a
        # CPU kernel's key layout): where K[h, t, d] sits, for a few (t, d)
        report["key_elements"] = {
            f"K[h0,t{tok},d{d}]": ((flat - k0[0, tok, d]).abs() < 1e-5).nonzero().flatten().tolist()[:4]
            for tok in (0, 1, 2) for d in (0, 1, 2, 16)}
        report["head_dim"] = k0.shape[-1]
    print(json.dumps(report, indent=1))
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
