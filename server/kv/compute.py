"""Where the `kv` strategy's model work runs, per engine: computing a span's KV after a
prefix (builds, the head) and moving keys to another position. (Recomputing joined
tokens, CacheBlend's and LegoLink's, runs inside the torch engine's steps:
server.engine.recompute.)

Both store the same thing: keys after RoPE and values, [L, 2, Hkv, n, D] in the model's
dtype, for a passage computed after the layout's head. A cache is keyed by the model's
fingerprint (its weights as loaded, so their dtype), the dtype and the head's tokens
(server.kv.store.entry_key), so a cache built by one engine is used by the other only
for the same weights in the same dtype and the same prompt layout, where both engines
compute the same attention.

- ``TorchKV``: on knowmux's own engine, prefills on its runner, on its engine thread.
- ``VLLMKV``: on vLLM, a span is computed by a one-token vLLM request whose prompt is the
  prefix and the span, and read out of vLLM's paged cache by the knowmux connector
  (server.engine.vllm_kv); injection is the connector's, so the joined prefix only needs
  keys re-rotated here, on the CPU.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..engine.kvcache import KVPrefix
from ..engine.model import Segment
from ..engine.rope import RopeOnly, rotate_keys


class TorchKV:
    engine_loads = False  # the engine imports the prefix into its row cache itself
    can_blend = True  # its steps recompute joined tokens (server.engine.recompute) and run APE's attention

    def __init__(self, engine):
        from ..fingerprint import model_fingerprint

        self.engine, self.runner = engine, engine.runner
        self.fingerprint = model_fingerprint(self.runner, engine.model_id)
        self.dtype = self.runner.dtype
        self.shape = (self.runner.n_layers, self.runner.n_kv_heads, self.runner.head_dim)

    def run(self, fn, background: bool = False):
        return self.engine.run_compute(fn, background)

    def span(self, prefix: Optional[KVPrefix], prefix_ids: list[int], ids: list[int],
             background: bool = False) -> KVPrefix:
        """KV of ``ids`` computed after ``prefix``: [L, 2, Hkv, len(ids), D] at positions len(prefix).."""
        def run() -> KVPrefix:
            start = prefix.length if prefix is not None else 0
            cache = self.runner.new_cache(start + len(ids))
            if prefix is not None:
                cache.import_prefix(prefix)
            self.runner.forward(self.runner.ids(ids), [Segment(cache, 0, len(ids))])
            return cache.export(start, start + len(ids))

        return self.run(run, background)

    def rotate(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        return rotate_keys(self.runner, kv, delta)


class VLLMKV:
    engine_loads = True  # the connector writes the prefix into vLLM's blocks and reports it
    can_blend = False  # CacheBlend's and LegoLink's recompute need a forward over chosen tokens: not through vLLM

    def __init__(self, engine):
        self.engine = engine
        self.fingerprint = engine.fingerprint()
        self.dtype = getattr(torch, engine.dtype)
        self.rope = RopeOnly.from_folder(engine.model_path)
        self.shape = (self.rope.n_layers, self.rope.n_kv_heads, self.rope.head_dim)

    def run(self, fn, background: bool = False):
        return fn()  # CPU tensor work on the calling thread; vLLM's thread only steps

    def span(self, prefix: Optional[KVPrefix], prefix_ids: list[int], ids: list[int],
             background: bool = False) -> KVPrefix:
        kv = self.engine.prefill_kv(list(prefix_ids) + list(ids), len(prefix_ids), len(prefix_ids) + len(ids))
        return KVPrefix(kv, len(prefix_ids))

    def rotate(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        return rotate_keys(self.rope, kv, delta)


def kv_compute(engine):
    """The KV computation for ``engine`` (it has the kv_injection capability)."""
    return VLLMKV(engine) if engine.name == "vllm" else TorchKV(engine)
