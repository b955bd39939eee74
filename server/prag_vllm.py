"""Parametric RAG on the vllm engine: one LoRA per retrieved document set.

vLLM applies one adapter per request, so the documents' adapters are combined into one,
the way peft's ``cat`` does: each adapter's (alpha / r) * scale is folded into its A, the
A's are stacked along the rank and the B's concatenated, and the combined adapter's
lora_alpha equals its rank k*r, so vLLM's own scaling (alpha / r) is 1 and the delta is
exactly sum_i s_i (alpha_i / r_i) B_i A_i, the torch engine's row delta. The combined
adapter is written in peft's format under ``DATA_DIR/combined/{hash}`` (atomically,
cached by document set and scales) and handed to vLLM as a LoRARequest; concurrent
requests with different sets share a batch up to vLLM's ``max_loras``.

Adapters are built here as on the torch engine (server.prag.AdapterBuilds): vLLM writes
the augmentations, and the LoRAs are trained through a ``LlamaRunner`` over a float32
copy of the weights, loaded from the model folder on vLLM's device at the first build
(vLLM's own weights are not reachable as modules, and adapters are trained and keyed in
float32) and kept for later builds. Training runs in the build's thread, beside vLLM's
steps rather than between them. The adapters are keyed by the same model fingerprint,
recipe and content hash as the torch engine's, so either engine serves the other's.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file

from adapters.bank import AdapterBank, AdapterError
from adapters.recipe import TARGET_MODULES, Recipe
from adapters.train import LoraTrainer
from indexes.atomic import atomic_folder

from .engine.vllm_engine import VLLMLora
from .fingerprint import fingerprint_of, model_fingerprint
from .prag import AdapterBuilds



def folder_fingerprint(path: Path, model_id: str, dtype: str = "float32") -> tuple[str, dict]:
    """The torch engine's model fingerprint for the weights loaded in ``dtype`` (adapters are
    keyed by float32's, the dtype they are trained in), and the FFN shapes, read from the
    model folder."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    c = model.config
    fp = fingerprint_of(c, model.model.embed_tokens.weight, model.lm_head.weight.t().contiguous(), model_id)
    shapes = {"gate_proj": (c.intermediate_size, c.hidden_size), "up_proj": (c.intermediate_size, c.hidden_size),
              "down_proj": (c.hidden_size, c.intermediate_size)}
    del model
    return fp, shapes


class VLLMPragService(AdapterBuilds):
    def __init__(self, engine, prompts, bank: AdapterBank, recipe: Recipe, root: Path, max_cached: int = 256,
                 build_group: int = 8):
        self.engine, self.prompts, self.bank, self.recipe = engine, prompts, bank, recipe
        self.build_group = max(1, build_group)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.fingerprint, self.shapes = folder_fingerprint(engine.model_path, engine.model_id)
        self.max_cached = max_cached
        self._lock = threading.Lock()
        self._train_lock = threading.Lock()
        self._trainer = self.train_runner = None

    def trainer(self) -> LoraTrainer:
        """The first build loads the model folder in float32 on vLLM's device (a second copy
        of the weights, kept for later builds) and trains through a LlamaRunner over it."""
        if self._trainer is None:
            from transformers import AutoModelForCausalLM

            from .engine.model import LlamaRunner

            model = AutoModelForCausalLM.from_pretrained(self.engine.model_path, dtype=torch.float32)
            model = model.to(self.engine.device).eval().requires_grad_(False)
            runner = LlamaRunner(model)
            if model_fingerprint(runner, self.engine.model_id) != self.fingerprint:
                raise AdapterError("the weights loaded for training are not the ones the adapters are keyed by")
            shared = {id(p): p for p in model.parameters()}  # peft's copy shares the frozen weights
            self._trainer = LoraTrainer(copy.deepcopy(model, shared), self.engine.tokenizer, self.recipe,
                                        self.fingerprint)
            self.train_runner = runner
        return self._trainer

    def row_adapters(self, docs: list, scales: list[float]):
        usable, missing, corrupt = [], [], []
        for doc, s in zip(docs, scales):
            if not self.has(doc):
                missing.append(doc.id)
                continue
            try:
                w = self.load(doc)
            except AdapterError:  # damaged: removed by load, never used
                missing.append(doc.id)
                corrupt.append(doc.id)
                continue
            usable.append((self.key(doc), s, w))
        if not usable:
            return None, 0, missing, corrupt
        rank = sum(w.rank for _, _, w in usable)
        if rank > self.engine.max_lora_rank:
            raise AdapterError(f"{len(usable)} adapters of total rank {rank} exceed the vllm engine's "
                               f"max_lora_rank {self.engine.max_lora_rank}; lower top_k")
        name = hashlib.sha256(json.dumps([(k, s) for k, s, _ in usable]).encode()).hexdigest()[:24]
        folder = self.root / name
        if not (folder / "adapter_model.safetensors").exists():
            self._write(folder, usable, rank)
        from vllm.lora.request import LoRARequest

        req = LoRARequest(lora_name=name, lora_int_id=int(name[:7], 16) + 1, lora_path=str(folder))
        return VLLMLora(req, rank), len(usable), missing, corrupt

    def _write(self, folder: Path, usable: list, rank: int) -> None:
        tensors = {}
        layers = sorted({layer for _, _, w in usable for layer, _ in w.deltas})
        for layer in layers:
            for proj in TARGET_MODULES:
                a_parts, b_parts = [], []
                for _, s, w in usable:
                    a, b = w.deltas[(layer, proj)]
                    a_parts.append(a * (w.scale * s))  # fold (alpha / r) * scale into A
                    b_parts.append(b)
                prefix = f"base_model.model.model.layers.{layer}.mlp.{proj}"
                tensors[f"{prefix}.lora_A.weight"] = torch.cat(a_parts, 0).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = torch.cat(b_parts, 1).contiguous()
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank,
                  "target_modules": list(TARGET_MODULES), "lora_dropout": 0.0, "bias": "none",
                  "fan_in_fan_out": False, "base_model_name_or_path": self.engine.model_id}
        with self._lock:
            with atomic_folder(folder, prefix="tmp-") as tmp:
                save_file(tensors, str(tmp / "adapter_model.safetensors"))
                (tmp / "adapter_config.json").write_text(json.dumps(config, indent=1))
            self._prune()

    def _prune(self) -> None:
        folders = sorted((p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("tmp-")),
                         key=lambda p: p.stat().st_mtime)
        for p in folders[:max(0, len(folders) - self.max_cached)]:
            shutil.rmtree(p, ignore_errors=True)
