"""The durable document store: SQLite, the source of truth.

Each document row holds id, title, text, content hash, timestamps, who added it, and
its embedding (float32 bytes), so the FAISS index can always be rebuilt from here
without re-embedding. Every change runs in one transaction and bumps ``generation``;
the index file records the generation it was built at, so a stale or half-written
index is detected on open and rebuilt.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

_SCHEMA = """
CREATE TABLE IF NOT EXISTS documents (
    vec_id INTEGER PRIMARY KEY AUTOINCREMENT,  -- the FAISS id; changes when the text does
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    embedding BLOB NOT NULL,
    added_by TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT OR IGNORE INTO meta VALUES ('generation', '0');
"""


def content_hash(title: str, text: str) -> str:
    return hashlib.sha256(f"{title}\x00{text}".encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    title: str = ""
    content_hash: str = ""
    added_by: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0


class DocumentStore:
    """Thread-safe (one connection behind a lock; WAL journal, synchronous=FULL)."""

    kind = "sqlite"
    store_id = "sqlite"  # one file per data dir: the index file beside it belongs to it

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        check = self._db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise sqlite3.DatabaseError(f"{self.path}: integrity check failed: {check}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def describe(self) -> str:
        return str(self.path)

    def changes_since(self, generation: int, dim: int):
        """None: this store keeps no change log (an index behind it is rebuilt whole; only
        ``knowmux ingest`` beside a running server writes behind its back)."""
        return None

    @property
    def generation(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM documents").fetchone()[0]

    def hashes(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        out: dict[str, str] = {}
        with self._lock:
            for i in range(0, len(ids), 500):
                chunk = ids[i:i + 500]
                q = f"SELECT id, content_hash FROM documents WHERE id IN ({','.join('?' * len(chunk))})"
                out.update(self._db.execute(q, chunk).fetchall())
        return out

    def upsert(self, docs: list[Document], embeddings: np.ndarray) -> list[tuple[int, Optional[int], str]]:
        """Insert or replace documents with their embeddings in one transaction.

        Returns (new vec_id, old vec_id or None, doc id) per document."""
        now = time.time()
        out = []
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for doc, emb in zip(docs, embeddings):
                    row = self._db.execute("SELECT vec_id, created_at FROM documents WHERE id=?", (doc.id,)).fetchone()
                    if row is not None:
                        self._db.execute("DELETE FROM documents WHERE id=?", (doc.id,))
                    cur = self._db.execute(
                        "INSERT INTO documents (id, title, text, content_hash, embedding, added_by, created_at, updated_at)"
                        " VALUES (?,?,?,?,?,?,?,?)",
                        (doc.id, doc.title, doc.text, doc.content_hash or content_hash(doc.title, doc.text),
                         np.asarray(emb, dtype=np.float32).tobytes(), doc.added_by,
                         row[1] if row else now, now))
                    out.append((cur.lastrowid, row[0] if row else None, doc.id))
                self._bump()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return out

    def delete(self, doc_id: str) -> Optional[int]:
        """Remove a document; returns its vec_id, or None if it was not there."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT vec_id FROM documents WHERE id=?", (doc_id,)).fetchone()
                if row is not None:
                    self._db.execute("DELETE FROM documents WHERE id=?", (doc_id,))
                    self._bump()
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return row[0] if row else None

    def _bump(self) -> None:
        self._db.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key='generation'")

    def get(self, doc_id: str) -> Optional[Document]:
        docs = self.get_many([doc_id])
        return docs.get(doc_id)

    def get_many(self, ids: list[str]) -> dict[str, Document]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT id, text, title, content_hash, added_by, created_at, updated_at FROM documents "
                f"WHERE id IN ({','.join('?' * len(ids))})", ids).fetchall() if ids else []
        return {r[0]: Document(*r) for r in rows}

    def page(self, after: Optional[str] = None, limit: int = 20) -> list[Document]:
        """Documents in id order after the id ``after`` (cursor paging)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, text, title, content_hash, added_by, created_at, updated_at FROM documents "
                "WHERE id > ? ORDER BY id LIMIT ?", (after if after is not None else "", limit)).fetchall()
        return [Document(*r) for r in rows]

    def ids_with_hash(self, content_hash: str) -> list[str]:
        """Documents with this content (artefacts are keyed by content: they are shared)."""
        with self._lock:
            rows = self._db.execute("SELECT id FROM documents WHERE content_hash=?", (content_hash,)).fetchall()
        return [r[0] for r in rows]

    def ids_for_vec(self, vec_ids: list[int]) -> dict[int, str]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT vec_id, id FROM documents WHERE vec_id IN ({','.join('?' * len(vec_ids))})",
                vec_ids).fetchall() if vec_ids else []
        return dict(rows)

    def all_embeddings(self, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(vec_ids [n] int64, embeddings [n, dim] float32, generation), read consistently."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                rows = self._db.execute("SELECT vec_id, embedding FROM documents ORDER BY vec_id").fetchall()
                gen = int(self._db.execute("SELECT value FROM meta WHERE key='generation'").fetchone()[0])
            finally:
                self._db.execute("COMMIT")
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        embs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
            else np.zeros((0, dim), dtype=np.float32)
        return ids, embs, gen


def store_kind(url) -> str:
    """"sqlite" or "postgresql", the kind of store a ``--store`` URL names: None or
    ``sqlite`` (the embedded default, in the data dir), ``sqlite:///path``, or
    ``postgresql://...`` (indexes.pgstore: shared by replicas); ValueError for anything else."""
    if url in (None, "", "sqlite") or url.startswith("sqlite:///"):
        return "sqlite"
    if url.startswith(("postgresql://", "postgres://")):
        return "postgresql"
    raise ValueError(f"KNOWMUX_STORE must be sqlite, sqlite:///path or postgresql://user@host:port/db (--store), "
                     f"got {url!r}")


def open_store(url, data_dir: Path):
    """The document store a URL names (``store_kind``)."""
    if store_kind(url) == "postgresql":
        from .pgstore import PostgresStore

        return PostgresStore(url)
    if url and url.startswith("sqlite:///"):
        return DocumentStore(Path(url[len("sqlite:///"):]))  # sqlite:///relative, sqlite:////absolute
    return DocumentStore(Path(data_dir) / "documents.sqlite3")
