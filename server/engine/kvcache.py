"""Per-row key/value cache, as an explicit object.

Each row of the running batch owns one ``RowCache``: a tensor of shape
``[n_layers, 2, n_kv_heads, capacity, head_dim]`` (index 0 = keys, 1 = values) and a
fill length. Keys are stored *after* rotary embedding, at the positions they were
computed for. A ``KVPrefix`` is a span exported from a cache (or loaded from the KV
store) that another row imports at its start.

A ``KVPool`` holds the caches of the running batch in one tensor
``[n_layers, 2, slots, n_kv_heads, row_tokens, head_dim]``: a pooled ``RowCache`` is a
view of one slot, with the same interface, and rows that decode in the same step can
be attended to in one batched call over the slot axis (``LlamaRunner.forward``) instead
of one call per row. The memory is only committed as slots are written.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Optional

import torch

from .ape import ParallelContext


@dataclass(frozen=True)
class KVPrefix:
    """An exported KV span: ``kv`` is ``[n_layers, 2, n_kv_heads, length, head_dim]``.

    ``start_pos`` is the position of the first token when its keys were rotated;
    importing at another position needs re-rotation (done by the KV strategy, not here).
    ``ids`` are the tokens it stands for, where known: an engine that prefills the whole
    prompt and injects the span into its own cache (vllm) needs them. ``load`` is what
    such an engine reports of the injection once the request has run (tokens written, or
    why it fell back to prefilling them).
    """

    kv: torch.Tensor
    start_pos: int = 0
    ids: Optional[tuple[int, ...]] = None
    load: dict = field(default_factory=dict, compare=False)
    # passages encoded apart that a row attends to APE's way (server.engine.ape)
    parallel: Optional[ParallelContext] = None
    # how the passages' keys were placed ("sequential" or "parallel"): an engine that caches
    # prompt blocks by token ids (vllm) must not serve one layout's blocks to the other
    layout: str = "sequential"

    @property
    def length(self) -> int:
        return self.kv.shape[3]


class RowCache:
    """KV storage of one row. Not thread-safe: only the engine thread touches it."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, pos_offset: int = 0, device=None):
        self._bind(torch.empty(n_layers, 2, n_kv_heads, capacity, head_dim, dtype=dtype, device=device), pos_offset)

    def _bind(self, kv: torch.Tensor, pos_offset: int, pool: Optional["KVPool"] = None, slot: int = -1) -> None:
        self.kv = kv
        self.length = 0  # tokens written for every layer so far
        self.pos_offset = pos_offset  # rotary position of slot 0 (slot i sits at pos_offset + i)
        self.pool = pool  # set when the storage is a slot of a pool
        self.slot = slot
        self.parallel: Optional[ParallelContext] = None  # set by importing a prefix that has one

    @classmethod
    def over(cls, kv: torch.Tensor, pos_offset: int, pool: "KVPool", slot: int) -> "RowCache":
        """An empty cache whose storage is ``kv`` (a pool slot's view)."""
        cache = cls.__new__(cls)
        cache._bind(kv, pos_offset, pool, slot)
        return cache

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store k, v of shape [n, n_kv_heads, head_dim] at positions start..start+n-1."""
        n = k.shape[0]
        if start + n > self.capacity:
            raise IndexError(f"KV write past capacity {self.capacity} (start {start}, n {n})")
        self.kv[layer, 0, :, start:start + n] = k.transpose(0, 1)
        self.kv[layer, 1, :, start:start + n] = v.transpose(0, 1)

    def view(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of the first ``length`` positions: two [n_kv_heads, length, head_dim] views."""
        return self.kv[layer, 0, :, :length], self.kv[layer, 1, :, :length]

    def import_prefix(self, prefix: KVPrefix) -> None:
        """Copy a prefix into positions 0..len-1 of an empty cache."""
        if self.length != 0:
            raise ValueError("import_prefix needs an empty cache")
        n = prefix.length
        if n > self.capacity or prefix.kv.shape[:3] != self.kv.shape[:3] or prefix.kv.shape[4] != self.kv.shape[4]:
            raise ValueError(f"prefix of shape {tuple(prefix.kv.shape)} does not fit cache {tuple(self.kv.shape)}")
        self.kv[:, :, :, :n] = prefix.kv.to(self.kv.device, self.kv.dtype)
        self.length = n
        self.parallel = prefix.parallel

    def export(self, start: int, end: int) -> KVPrefix:
        """A copy of positions start..end-1 (keys keep the rotation of those positions)."""
        if not 0 <= start <= end <= self.length:
            raise IndexError(f"export [{start}, {end}) outside filled length {self.length}")
        return KVPrefix(self.kv[:, :, :, start:end].clone(), start_pos=start)


class KVPool:
    """Fixed-size slots of one tensor, handed out as ``RowCache`` views (lowest slot first,
    so the running batch stays in a compact slot range). Engine thread only."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, slots: int, row_tokens: int,
                 dtype: torch.dtype = torch.float32, device=None):
        self.kv = torch.empty(n_layers, 2, slots, n_kv_heads, row_tokens, head_dim, dtype=dtype, device=device)
        self.row_tokens = row_tokens
        self._free = list(range(slots))  # a heap
        # Positions 0..clean[s]-1 of slot s hold finite numbers (written or zeroed once). A
        # batched attention reads a row's slot past its own length (masked out, weight 0),
        # and 0 * NaN from never-written memory would still poison it.
        self.clean = [0] * slots

    def ensure_clean(self, slot: int, start: int, end: int) -> None:
        """Make positions ``start..end-1`` of a slot finite, zeroing only what was never clean
        (``start``: the first position the row has not written)."""
        lo = max(self.clean[slot], start)
        if lo < end:
            self.kv[:, :, slot, :, lo:end].zero_()
        self.clean[slot] = max(self.clean[slot], end)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    def acquire(self, capacity: int, pos_offset: int = 0) -> Optional[RowCache]:
        """A cache in a free slot, or None when none is free or ``capacity`` exceeds a slot."""
        if capacity > self.row_tokens or not self._free:
            return None
        slot = heapq.heappop(self._free)
        return RowCache.over(self.kv[:, :, slot], pos_offset, self, slot)  # [L, 2, Hkv, row_tokens, D] view

    def release(self, cache: RowCache) -> None:
        """Give the slot back (idempotent); the cache must not be used afterwards."""
        if cache.pool is self and cache.slot >= 0:
            heapq.heappush(self._free, cache.slot)
            cache.slot, cache.pool = -1, None
            cache.kv = cache.kv[:, :, :, :0]  # a stale reference now fails loudly instead of reading another row
