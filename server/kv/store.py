"""The KV store: one safetensors file per (model, dtype, recipe, prefix, tokens), in three tiers.

A stored entry is ``kv`` of shape [n_layers, 2, n_kv_heads, n_tokens, head_dim] in the
model's dtype (float32, bfloat16 or float16: stored as computed, never converted), keys
rotated for positions start_pos..start_pos+n-1, plus metadata. The file name is the
sha256 of everything that changes the tensors (``entry_key``), so a cache from another
model, dtype, recipe version, prefix or tokenisation is never found; when a file is read
its metadata and a checksum of the tensor bytes are checked as well (the entry's dtype
against the one asked for too), so a truncated, altered or mislabelled file is reported
and rebuilt, never used.

The tiers, nearest first:

1. memory: an LRU bounded in bytes (``memory_bytes``). A hit costs a dictionary lookup;
   the checksum was verified once, when the entry came in.
2. local disk (``root``): files written under a temporary name and renamed. With a disk
   budget (``disk_bytes``, KNOWMUX_KV_STORE_BYTES) the least recently used files are
   deleted once the total passes it. Recency is the file's modification time (touched on
   every hit), so the order survives a restart. A file is read with one ``readinto`` into
   the buffer the tensor then uses (no second copy); a reader that opened a file before
   it was evicted reads it whole (POSIX keeps an unlinked file's data for open readers),
   one that comes after finds it missing, never half there.
3. a shared tier (``tier``, server.tiers: a shared directory or an S3-compatible store):
   every built entry is written there too, and a local miss is looked up there before
   the caller rebuilds; a fetched object is checked like a local file, then kept locally.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import save as st_save

from indexes.atomic import atomic_write_bytes

from .. import tiers
from ..engine.device import tensor_bytes

log = logging.getLogger(__name__)

# Bump when the way passage caches are computed changes (wrapper, prefix, positions).
KV_RECIPE_VERSION = "kv-1:after-head"

_ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


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
    def __init__(self, root: Path, memory_bytes: int = 512 * 1024 * 1024, disk_bytes: int = 0, tier=None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.memory_bytes = memory_bytes
        self.disk_bytes = disk_bytes  # 0: no budget
        self.tier = tier  # server.tiers.Tier or None
        self._lru: collections.OrderedDict[str, KVEntry] = collections.OrderedDict()
        self._lru_bytes = 0
        self._lock = threading.Lock()
        # local files, least recently used first: key -> size
        self._disk: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._disk_total = 0
        self.evicted = 0  # files deleted for the disk budget (reported by /health)
        self._scan()

    def _scan(self) -> None:
        files = []
        for p in self.root.glob("*.safetensors"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            files.append((st.st_mtime_ns, p.stem, st.st_size))
        for _, key, size in sorted(files):
            self._disk[key] = size
            self._disk_total += size

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    # ---- reading -------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        """Stored in some tier (the shared one asked last), without loading it."""
        with self._lock:
            if key in self._lru:
                return True
        if self.path(key).exists():
            return True
        return self._tier_call("exists", key) or False

    def get(self, key: str, dtype: Optional[torch.dtype] = None) -> tuple[Optional[KVEntry], str]:
        """(entry, where) with where in "memory", "disk", "tier", "missing" or "corrupt".
        With ``dtype``, an entry of another dtype is refused ("corrupt": its key says one
        thing and its tensor another)."""
        with self._lock:
            entry = self._lru.get(key)
            if entry is not None:
                self._lru.move_to_end(key)
                self._touch(key)
                return self._check_dtype(entry, dtype, "memory")
        p = self.path(key)
        try:
            data = _read_file(p)
            where = "disk"
        except FileNotFoundError:  # never stored, or evicted (whole) before we opened it
            with self._lock:  # (deleted by another process sharing the folder: stop counting it)
                if not p.exists():  # checked under the lock: a writer may have renamed it in since
                    self._forget_file(key)
            data = self._tier_call("get", key)
            if data is None:
                return None, "missing"
            data, where = bytearray(data), "tier"
        except (OSError, KVCorrupt) as e:
            log.warning("KV cache %s is unreadable (%s); it will be rebuilt", p.name, e)
            return None, "corrupt"
        try:
            entry = self._read(key, data)
        except (KVCorrupt, OSError, ValueError, KeyError, TypeError) as e:
            log.warning("KV cache %s (%s) is unusable (%s); it will be rebuilt", p.name, where, e)
            return None, "corrupt"
        entry, where = self._check_dtype(entry, dtype, where)
        if entry is None:
            return None, where
        if where == "tier":
            self._write_local(key, bytes(data))
        else:
            with self._lock:
                self._touch(key)
        self._remember(entry)
        return entry, where

    @staticmethod
    def _check_dtype(entry: KVEntry, dtype, where: str):
        if dtype is not None and entry.kv.dtype != dtype:
            log.warning("KV cache %s holds %s, not %s: refused", entry.key, entry.kv.dtype, dtype)
            return None, "corrupt"
        return entry, where

    def _read(self, key: str, data) -> KVEntry:
        """Parse and check a stored file's bytes; the tensor shares ``data``'s memory."""
        header_len = int.from_bytes(bytes(data[:8]), "little")
        if not 0 < header_len <= len(data) - 8:
            raise KVCorrupt("bad header length")
        header = json.loads(bytes(data[8:8 + header_len]))
        meta, info = header.get("__metadata__", {}), header.get("kv")
        if meta.get("key") != key or meta.get("recipe") != KV_RECIPE_VERSION:
            raise KVCorrupt("key or recipe version does not match the file name")
        if not info or info.get("dtype") not in _ST_DTYPES:
            raise KVCorrupt(f"no kv tensor of a known dtype ({(info or {}).get('dtype')})")
        begin, end = info["data_offsets"]
        start = 8 + header_len + begin
        dtype, shape = _ST_DTYPES[info["dtype"]], info["shape"]
        n = 1
        for d in shape:
            n *= d
        if end - begin != n * torch.empty(0, dtype=dtype).element_size() or 8 + header_len + end > len(data):
            raise KVCorrupt("tensor bytes do not match its shape (truncated?)")
        raw = memoryview(data)[start:8 + header_len + end]
        if hashlib.sha256(raw).hexdigest() != meta.get("sha256"):
            raise KVCorrupt("tensor checksum mismatch")
        if n == 0:
            kv = torch.empty(shape, dtype=dtype)
        else:
            kv = torch.frombuffer(data, dtype=dtype, count=n, offset=start).view(shape)
        return KVEntry(key, kv, int(meta["start_pos"]), meta.get("doc_id", ""))

    # ---- writing -------------------------------------------------------------------
    def put(self, entry: KVEntry, meta: dict) -> int:
        """Store an entry in every tier; returns the bytes written."""
        kv = entry.kv.detach().contiguous().cpu()
        metadata = {k: str(v) for k, v in meta.items()}
        metadata.update(key=entry.key, start_pos=str(entry.start_pos), doc_id=entry.doc_id,
                        sha256=hashlib.sha256(tensor_bytes(kv)).hexdigest(), recipe=KV_RECIPE_VERSION)
        data = st_save({"kv": kv}, metadata=metadata)
        self._write_local(entry.key, data)
        self._tier_call("put", entry.key, data)
        self._remember(KVEntry(entry.key, kv, entry.start_pos, entry.doc_id))
        return len(data)

    def _write_local(self, key: str, data: bytes) -> None:
        atomic_write_bytes(self.path(key), data)
        with self._lock:
            self._stamp(key)
            self._forget_file(key)
            self._disk[key] = len(data)
            self._disk_total += len(data)
            self._evict(keep=key)

    def remove(self, key: str) -> bool:
        """Delete an entry from every tier; True if some tier held it."""
        with self._lock:
            entry = self._lru.pop(key, None)
            if entry is not None:
                self._lru_bytes -= entry.nbytes
            self._forget_file(key)
        found = entry is not None
        try:
            self.path(key).unlink()
            found = True
        except FileNotFoundError:
            pass
        if self.tier is not None and self._tier_call("exists", key):
            self._tier_call("delete", key)
            found = True
        return found

    # ---- bookkeeping (under self._lock) ---------------------------------------------
    def _touch(self, key: str) -> None:
        if key in self._disk:
            self._disk.move_to_end(key)
            self._stamp(key)

    def _stamp(self, key: str) -> None:
        """Set the file's time to now, to the nanosecond: recency that survives a restart
        (the kernel's own stamp is coarse, a few ms, so files written together would tie)."""
        now = time.time_ns()
        try:
            os.utime(self.path(key), ns=(now, now))
        except OSError:
            pass

    def _forget_file(self, key: str) -> None:
        size = self._disk.pop(key, None)
        if size is not None:
            self._disk_total -= size

    def _evict(self, keep: str) -> None:
        """Delete least recently used files until the disk total fits the budget (never
        ``keep``, the file just written, even when it alone is over)."""
        if self.disk_bytes <= 0:
            return
        for key in list(self._disk):
            if self._disk_total <= self.disk_bytes:
                break
            if key == keep:
                continue
            self._forget_file(key)
            self.path(key).unlink(missing_ok=True)
            self.evicted += 1

    def _remember(self, entry: KVEntry) -> None:
        with self._lock:
            if entry.key in self._lru:
                return
            self._lru[entry.key] = entry
            self._lru_bytes += entry.nbytes
            while self._lru_bytes > self.memory_bytes and len(self._lru) > 1:
                _, old = self._lru.popitem(last=False)
                self._lru_bytes -= old.nbytes

    def _tier_call(self, op: str, key: str, *args):
        """A call on the shared tier for entry ``key``; a tier that fails counts as a miss."""
        return tiers.call(self.tier, op, f"{key}.safetensors", *args, label="KV tier")

    def forget_memory(self) -> None:
        with self._lock:
            self._lru.clear()
            self._lru_bytes = 0

    def info(self) -> dict:
        with self._lock:
            return {"memory_bytes": self._lru_bytes, "memory_budget": self.memory_bytes,
                    "memory_entries": len(self._lru), "disk_bytes": self._disk_total,
                    "disk_budget": self.disk_bytes or None, "disk_files": len(self._disk),
                    "evicted": self.evicted, "tier": self.tier.url if self.tier is not None else None}


def _read_file(path: Path) -> bytearray:
    """A whole file in one writable buffer (``torch.frombuffer`` shares it without copying)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        got = f.readinto(buf)
    if got != size:
        raise KVCorrupt(f"short read ({got} of {size} bytes)")
    return buf
