"""KnowledgeBase: the store, the embedder and the FAISS index kept in step.

Write path (upsert/delete): embed outside the lock, commit to SQLite (the
acknowledgement point), update the in-memory index, save the index file atomically.
If the process dies between the commit and the index save, the next open sees the
generation mismatch and rebuilds the index from the embeddings in SQLite. Another
process (``knowmux ingest`` beside a running server) bumps the generation too; a
search notices and reloads.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from .store import Document, DocumentStore, content_hash
from .vector import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float


class KnowledgeBase:
    def __init__(self, data_dir: Path, embedder):
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        try:
            self.store = DocumentStore(self.data_dir / "documents.sqlite3")
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.data_dir / 'documents.sqlite3'} is damaged ({e}). It is the source of truth "
                             "(documents and embeddings) and cannot be rebuilt from anything else: restore it from "
                             "a backup, or re-ingest the corpus into a fresh data dir") from None
        self._index_path = self.data_dir / "index.faiss"
        self._lock = threading.RLock()
        self._load_index()

    def _load_index(self) -> None:
        gen = self.store.generation
        idx = VectorIndex.load(self._index_path, gen, self.embedder.dim)
        if idx is None:
            ids, embs, gen = self.store.all_embeddings(self.embedder.dim)
            idx = VectorIndex(self.embedder.dim)
            idx.add(ids, embs)
            log.info("rebuilt the vector index from %d stored embeddings", len(ids))
            idx.save(self._index_path, gen)
        self._index, self._gen = idx, gen

    def _refresh(self) -> None:
        if self.store.generation != self._gen:
            self._load_index()

    def count(self) -> int:
        return self.store.count()

    def upsert(self, docs: list[Document]) -> list[tuple[str, str]]:
        """Add or replace documents by id. Returns (id, "created" | "updated" | "unchanged").
        Documents whose title and text are unchanged are not re-embedded."""
        docs = [d if d.content_hash else Document(d.id, d.text, d.title, content_hash(d.title, d.text), d.added_by)
                for d in docs]
        known = self.store.hashes(d.id for d in docs)
        # the last occurrence of an id within one call wins
        latest = {d.id: d for d in docs}
        todo = [d for d in latest.values() if known.get(d.id) != d.content_hash]
        status = {d.id: ("unchanged" if known.get(d.id) == d.content_hash else
                         "updated" if d.id in known else "created") for d in latest.values()}
        if todo:
            embs = self.embedder.encode([_embed_text(d) for d in todo])
            with self._lock:
                self._refresh()
                changes = self.store.upsert(todo, embs)
                self._compute(lambda: (self._index.remove([old for _, old, _ in changes if old is not None]),
                                       self._index.add([new for new, _, _ in changes], embs)))
                self._gen = self.store.generation
                self._index.save(self._index_path, self._gen)
        return [(d.id, status[d.id]) for d in latest.values()]

    def delete(self, doc_id: str) -> bool:
        with self._lock:
            self._refresh()
            vec_id = self.store.delete(doc_id)
            if vec_id is None:
                return False
            self._compute(lambda: self._index.remove([vec_id]))
            self._gen = self.store.generation
            self._index.save(self._index_path, self._gen)
            return True

    def search(self, query: str, k: int) -> list[Hit]:
        """Top-k documents by cosine similarity of embeddings, best first."""
        return self.search_vector(self.embed_query(query), k)

    def embed_query(self, query: str):
        """The query's normalised embedding (what search compares against; the router's features)."""
        return self.embedder.encode([query])[0]

    def search_vector(self, emb, k: int) -> list[Hit]:
        with self._lock:
            self._refresh()
            found = self._compute(lambda: self._index.search(emb, k))
        names = self.store.ids_for_vec([v for v, _ in found])
        return [Hit(names[v], s) for v, s in found if v in names]

    def _compute(self, fn):
        """FAISS parallelises with the OpenMP runtime torch loaded: its searches run where
        the embedder's model runs (a serving process's compute thread; server.engine.compute)."""
        run = getattr(self.embedder, "run", None)
        return run(fn) if run is not None else fn()

    def get_many(self, ids: list[str]) -> dict[str, Document]:
        return self.store.get_many(ids)

    def close(self) -> None:
        self.store.close()


def _embed_text(doc: Document) -> str:
    return f"{doc.title}\n{doc.text}" if doc.title else doc.text
