"""KnowledgeBase: the store, the embedder and the FAISS index kept in step.

Write path (upsert/delete): embed outside the lock, commit to the store (the
acknowledgement point), update the in-memory index, save the index file atomically.
If the process dies between the commit and the index save, the next open sees the
generation mismatch and rebuilds the index from the stored embeddings (SQLite) or
catches up from the store's change log (PostgreSQL, indexes.pgstore). Another process
(``knowmux ingest`` beside a running server, another replica) moves the generation
too; every search checks it first and reloads (SQLite) or catches up (PostgreSQL), so a
document acknowledged anywhere is found by the next search everywhere.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from .store import Document, content_hash, open_store
from .vector import VectorIndex

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    doc_id: str
    score: float


class KnowledgeBase:
    def __init__(self, data_dir: Path, embedder, store=None):
        """``store``: a document store URL (indexes.store.open_store; None: SQLite in the data
        dir) or an open store."""
        self.data_dir = Path(data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.embedder = embedder
        if store is None or isinstance(store, str):
            try:
                store = open_store(store, self.data_dir)
            except sqlite3.DatabaseError as e:
                raise ValueError(f"{self.data_dir / 'documents.sqlite3'} is damaged ({e}). It is the source of "
                                 "truth (documents and embeddings) and cannot be rebuilt from anything else: restore "
                                 "it from a backup, or re-ingest the corpus into a fresh data dir") from None
        self.store = store
        self._index_path = self.data_dir / "index.faiss"
        self._lock = threading.RLock()
        self._load_index()

    def _load_index(self) -> None:
        """The saved index if it belongs to this store, caught up to the store's changes;
        else rebuilt from the stored embeddings."""
        saved = VectorIndex.load(self._index_path, self.embedder.dim, self.store.store_id)
        if saved is not None:
            self._index, self._gen = saved
            now = self.store.generation
            if self._gen == now or (self._gen < now and self._catch_up()):
                return
        self._rebuild()

    def _rebuild(self) -> None:
        ids, embs, gen = self.store.all_embeddings(self.embedder.dim)
        idx = VectorIndex(self.embedder.dim)
        idx.add(ids, embs)
        log.info("rebuilt the vector index from %d stored embeddings", len(ids))
        self._index, self._gen = idx, gen
        self._save_index()

    def _save_index(self) -> None:
        self._index.save(self._index_path, self._gen, self.store.store_id)

    def _catch_up(self) -> bool:
        """Apply the store's changes since this index's generation (other replicas' writes
        and this one's); False when the store keeps no change log."""
        delta = self.store.changes_since(self._gen, self.embedder.dim)
        if delta is None:
            return False
        removed, ids, embs, gen = delta
        if len(removed) or len(ids):
            self._compute(lambda: (self._index.remove(removed), self._index.add(ids, embs)))
        self._gen = gen
        return True

    def _refresh(self) -> None:
        """Before a search or a write: a store with a change log is asked for the changes
        since this index's generation (one query when there are none); one without is
        asked for its generation, and a moved one means a rebuild."""
        if not self._catch_up() and self.store.generation != self._gen:
            self._rebuild()

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
                if not self._catch_up():  # no change log: apply this write here
                    self._compute(lambda: (self._index.remove([old for _, old, _ in changes if old is not None]),
                                           self._index.add([new for new, _, _ in changes], embs)))
                    self._gen = self.store.generation
                self._save_index()
        return [(d.id, status[d.id]) for d in latest.values()]

    def delete(self, doc_id: str) -> bool:
        with self._lock:
            self._refresh()
            vec_id = self.store.delete(doc_id)
            if vec_id is None:
                return False
            if not self._catch_up():
                self._compute(lambda: self._index.remove([vec_id]))
                self._gen = self.store.generation
            self._save_index()
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
