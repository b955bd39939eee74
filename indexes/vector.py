"""The FAISS index over document embeddings, persisted atomically in the data dir.

Exact inner-product search (IndexFlatIP in an IndexIDMap2) over normalised vectors,
keyed by the store's integer vec_id. It stays on the CPU on GPU machines too: a flat
search over 100,000 MiniLM vectors is a few milliseconds there, and faiss-gpu's ID map
cannot remove ids (deletes would mean rebuilding a GPU copy). The file is a cache of the document store: ``index.meta.json``
records which store (``store_id``), its generation and the file's sha256; a damaged
file or another store's means rebuild, an older generation means catching up (a store
with a change log) or rebuilding (SQLite).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from .atomic import atomic_write_bytes


def _faiss():
    import faiss

    return faiss


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class VectorIndex:
    def __init__(self, dim: int):
        faiss = _faiss()
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def size(self) -> int:
        return self.index.ntotal

    def add(self, vec_ids: np.ndarray, embeddings: np.ndarray) -> None:
        if len(vec_ids):
            self.index.add_with_ids(np.ascontiguousarray(embeddings, dtype=np.float32),
                                    np.asarray(vec_ids, dtype=np.int64))

    def remove(self, vec_ids: list[int]) -> None:
        if vec_ids:
            self.index.remove_ids(np.asarray(vec_ids, dtype=np.int64))

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """query [dim] normalised -> up to k (vec_id, cosine score), best first."""
        if self.size == 0 or k <= 0:
            return []
        scores, ids = self.index.search(np.asarray(query, dtype=np.float32).reshape(1, -1), min(k, self.size))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def save(self, path: Path, generation: int, store_id: str = "sqlite") -> None:
        faiss = _faiss()
        data = faiss.serialize_index(self.index).tobytes()
        atomic_write_bytes(path, data)
        meta = {"generation": generation, "store_id": store_id, "sha256": hashlib.sha256(data).hexdigest(),
                "dim": self.dim, "count": self.size}
        atomic_write_bytes(path.with_suffix(".meta.json"), json.dumps(meta).encode())

    @classmethod
    def load(cls, path: Path, dim: int, store_id: str = "sqlite") -> "tuple[VectorIndex, int] | None":
        """(the saved index, the store generation it was built at) if it is intact and was
        built from this store (``store_id``) at this dimension; else None."""
        meta_path = path.with_suffix(".meta.json")
        try:
            meta = json.loads(meta_path.read_text())
            if (meta.get("store_id", "sqlite") != store_id or meta.get("dim") != dim
                    or not isinstance(meta.get("generation"), int) or _sha256(path) != meta.get("sha256")):
                return None
            faiss = _faiss()
            idx = cls(dim)
            idx.index = faiss.deserialize_index(np.fromfile(path, dtype=np.uint8))
            return idx, meta["generation"]
        except (OSError, ValueError, RuntimeError):
            return None
