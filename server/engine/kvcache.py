"""Per-row key/value cache, as an explicit object.

Each row of the running batch owns one ``RowCache``: a tensor of shape
``[n_layers, 2, n_kv_heads, capacity, head_dim]`` (index 0 = keys, 1 = values) and a
fill length. Keys are stored *after* rotary embedding, at the positions they were
computed for. A ``KVPrefix`` is a span exported from a cache (or loaded from the KV
store) that another row imports at its start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVPrefix:
    """An exported KV span: ``kv`` is ``[n_layers, 2, n_kv_heads, length, head_dim]``.

    ``start_pos`` is the position of the first token when its keys were rotated;
    importing at another position needs re-rotation (done by the KV strategy, not here).
    """

    kv: torch.Tensor
    start_pos: int = 0

    @property
    def length(self) -> int:
        return self.kv.shape[3]


class RowCache:
    """KV storage of one row. Not thread-safe: only the engine thread touches it."""

    def __init__(self, n_layers: int, n_kv_heads: int, head_dim: int, capacity: int,
                 dtype: torch.dtype = torch.float32, pos_offset: int = 0):
        self.kv = torch.empty(n_layers, 2, n_kv_heads, capacity, head_dim, dtype=dtype)
        self.length = 0  # tokens written for every layer so far
        self.pos_offset = pos_offset  # rotary position of slot 0 (slot i sits at pos_offset + i)

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
        self.kv[:, :, :, :n] = prefix.kv.to(self.kv.dtype)
        self.length = n

    def export(self, start: int, end: int) -> KVPrefix:
        """A copy of positions start..end-1 (keys keep the rotation of those positions)."""
        if not 0 <= start <= end <= self.length:
            raise IndexError(f"export [{start}, {end}) outside filled length {self.length}")
        return KVPrefix(self.kv[:, :, :, start:end].clone(), start_pos=start)
