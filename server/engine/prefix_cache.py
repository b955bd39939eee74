"""Automatic prefix caching: KV of prompt blocks shared by requests, computed once.

Prompts are cut into blocks of ``block`` tokens; block i's key chains the hash of block
i-1 with its own token ids (as nano-vllm and vLLM do), so a key identifies the whole
prefix up to that block, and the stored KV (computed at positions i*block..) is exactly
what a prefill of that prefix writes. Only plain rows use it: a row with low-rank
deltas or an injected prefix has different KV for the same tokens. Bounded in tokens,
least recently used blocks leave first.
"""

from __future__ import annotations

import collections
import hashlib
from typing import Optional

import torch

from .kvcache import KVPrefix, RowCache


def _chain(prev: bytes, block: list[int]) -> bytes:
    return hashlib.blake2b(prev + b"|" + ",".join(map(str, block)).encode(), digest_size=16).digest()


class PrefixCache:
    def __init__(self, block: int = 16, max_tokens: int = 16384):
        if block < 1:
            raise ValueError(f"the prefix cache block must be at least 1 token, got {block}")
        self.block, self.max_blocks = block, max(1, max_tokens // block)
        self._blocks: collections.OrderedDict[bytes, torch.Tensor] = collections.OrderedDict()
        self.hits = self.queries = 0  # tokens served from the cache / prompt tokens looked up

    def _keys(self, ids: list[int], n_blocks: int) -> list[bytes]:
        keys, h = [], b""
        for i in range(n_blocks):
            h = _chain(h, ids[i * self.block:(i + 1) * self.block])
            keys.append(h)
        return keys

    def lookup(self, ids: list[int]) -> Optional[KVPrefix]:
        """The longest cached prefix of ``ids`` that leaves at least one token to prefill."""
        self.queries += len(ids)
        usable = (len(ids) - 1) // self.block
        parts = []
        for key in self._keys(ids, usable):
            kv = self._blocks.get(key)
            if kv is None:
                break
            self._blocks.move_to_end(key)
            parts.append(kv)
        if not parts:
            return None
        self.hits += len(parts) * self.block
        return KVPrefix(torch.cat(parts, dim=3), 0)

    def cached_length(self, ids: list[int]) -> int:
        """How many leading tokens of ``ids`` a lookup would serve now (no statistics, no
        reordering): for the scheduler's question whether waiting for a twin is worth it."""
        n = 0
        for key in self._keys(ids, (len(ids) - 1) // self.block):
            if key not in self._blocks:
                break
            n += self.block
        return n

    def insert(self, ids: list[int], cache: RowCache) -> None:
        """Store the full blocks of ``ids`` whose KV ``cache`` holds at positions 0.."""
        n_blocks = min(len(ids), cache.length) // self.block
        for i, key in enumerate(self._keys(ids, n_blocks)):
            if key in self._blocks:
                self._blocks.move_to_end(key)
                continue
            s = i * self.block
            self._blocks[key] = cache.kv[:, :, :, s:s + self.block].clone()
            while len(self._blocks) > self.max_blocks:
                self._blocks.popitem(last=False)
