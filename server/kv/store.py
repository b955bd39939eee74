"""The KV store: one safetensors file per (model, dtype, recipe, prefix, tokens).

A stored entry is ``kv`` of shape [n_layers, 2, n_kv_heads, n_tokens, head_dim] in the
model's dtype, keys rotated for positions start_pos..start_pos+n-1, plus metadata. The
file name is the sha256 of everything that changes the tensors (``entry_key``), so a
cache from another model, dtype, recipe version, prefix or tokenisation is never
found; on load the metadata and a checksum of the tensor bytes are checked as well,
so a truncated or altered file is reported and rebuilt, never used. Files are written
under a temporary name and renamed. A memory LRU bounded in bytes sits in front.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from indexes.atomic import atomic_write_bytes

log = logging.getLogger(__name__)

# Bump when the way passage caches are computed changes (wrapper, prefix, positions).
KV_RECIPE_VERSION = "kv-1:after-head"


def entry_key(model_fingerprint: str, dtype: str, prefix_ids: list[int], token_ids: list[int]) -> str:
    blob = json.dumps({"model": model_fingerprint, "dtype": dtype, "recipe": KV_RECIPE_VERSION,
                       "prefix": prefix_ids, "ids": token_ids}, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclass(frozen=True)
class KVEntry:
    key: str
    kv: torch.Tensor
    start_pos: int
    doc_id: str = ""

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    @property
    def n_tokens(self) -> int:
        return self.kv.shape[3]


class KVCorrupt(ValueError):
    pass


class KVStore:
    def __init__(self, root: Path, memory_bytes: int = 512 * 1024 * 1024):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self._lru: collections.OrderedDict[str, KVEntry] = collections.OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def remove(self, key: str) -> bool:
        with self._lock:
            entry = self._lru.pop(key, None)
            if entry is not None:
                self._lru_bytes -= entry.nbytes
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return entry is not None

    def contains(self, key: str) -> bool:
        with self._lock:
            if key in self._lru:
                return True
        return self.path(key).exists()

    def get(self, key: str) -> tuple[Optional[KVEntry], str]:
        """(entry, where) with where in "memory", "disk", "missing" or "corrupt"."""
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None:
                self._lru.move_to_end(key)
                return entry, "memory"
        p = self.path(key)
        if not p.exists():
            return None, "missing"
        try:
            entry = self._read(key, p.read_bytes())
        except (KVCorrupt, SafetensorError, OSError, ValueError, KeyError) as e:
            log.warning("KV cache %s is unusable (%s); it will be rebuilt", p.name, e)
            return None, "corrupt"
        self._remember(entry)
        return entry, "disk"

    def put(self, entry: KVEntry, meta: dict) -> int:
        """Store an entry; returns the bytes written."""
        kv = entry.kv.contiguous()
        metadata = {k: str(v) for k, v in meta.items()}
        metadata.update(key=entry.key, start_pos=str(entry.start_pos), doc_id=entry.doc_id,
                        sha256=hashlib.sha256(kv.numpy().tobytes()).hexdigest(), recipe=KV_RECIPE_VERSION)
        data = st_save({"kv": kv}, metadata=metadata)
        atomic_write_bytes(self.path(entry.key), data)
        self._remember(entry)
        return len(data)

    def _read(self, key: str, data: bytes) -> KVEntry:
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
        kv = st_load(data)["kv"]
        if meta.get("key") != key or meta.get("recipe") != KV_RECIPE_VERSION:
            raise KVCorrupt("key or recipe version does not match the file name")
        if hashlib.sha256(kv.numpy().tobytes()).hexdigest() != meta.get("sha256"):
            raise KVCorrupt("tensor checksum mismatch")
        return KVEntry(key, kv, int(meta["start_pos"]), meta.get("doc_id", ""))

    def _remember(self, entry: KVEntry) -> None:
        with self._lock:
            if entry.key in self._lru:
                return
            self._lru[entry.key] = entry
            self._lru_bytes += entry.nbytes
            while self._lru_bytes > self.memory_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes

    def forget_memory(self) -> None:
        with self._lock:
            self._lru.clear()
            self._lru_bytes = 0
