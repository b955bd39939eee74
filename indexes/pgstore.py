"""The shared document store: PostgreSQL, the source of truth for every replica.

The same interface as the embedded SQLite store (indexes.store.DocumentStore), plus a
change log. Each write (upsert, delete) appends to ``knowmux_changes`` in its own
transaction: a row per FAISS id added or removed, numbered by a sequence. Writers take
one transaction-level advisory lock first, so change numbers commit in order and a
reader that has applied everything up to N never sees N+1 commit after N+2. A replica's
FAISS index is a cache of this store at some change number (its ``generation``): it
catches up by applying the changes after it (``changes_since``), so a document
acknowledged through one replica is found by another's next search (every search first
asks for the changes after its own number: one indexed query when there are none).

URL: ``postgresql://user:password@host:port/dbname`` (psycopg 3). A connection that
breaks (server restart, network) is opened again at the next call; the call that met the
break raises ``StoreUnavailable`` (a 503 with Retry-After on the API).
"""

from __future__ import annotations

import threading
import time
import uuid
from contextlib import contextmanager
from typing import Iterable, Optional

import numpy as np

from .store import Document, content_hash

# one number per database for the advisory locks: schema creation, and the writers' order
SCHEMA_LOCK, _WRITE_LOCK = 0x6B6D7801, 0x6B6D7802

_SCHEMA = """
CREATE TABLE IF NOT EXISTS knowmux_documents (
    vec_id BIGSERIAL PRIMARY KEY,  -- the FAISS id; a new one when the text changes, never reused
    id TEXT NOT NULL UNIQUE,
    title TEXT NOT NULL DEFAULT '',
    text TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    embedding BYTEA NOT NULL,
    added_by TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS knowmux_documents_hash ON knowmux_documents (content_hash);
CREATE TABLE IF NOT EXISTS knowmux_changes (
    seq BIGSERIAL PRIMARY KEY,
    vec_id BIGINT NOT NULL,
    added BOOLEAN NOT NULL,
    at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS knowmux_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

_COLUMNS = "id, text, title, content_hash, added_by, created_at, updated_at"


class StoreUnavailable(RuntimeError):
    """The shared store could not be reached; the call did not happen (or rolled back)."""


def _psycopg():
    try:
        import psycopg
    except ImportError as e:  # pragma: no cover - a dependency of the project
        raise ValueError("--store postgresql://... needs psycopg (pip install 'psycopg[binary]')") from e
    return psycopg


def redact(url: str) -> str:
    """The URL without its password (for logs and /health)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


class PgConnection:
    """One psycopg connection behind a lock; ``tx()`` runs a block in one transaction. A
    connection that broke is opened again at the next call; the call that met the break
    raises ``StoreUnavailable`` (its transaction rolled back)."""

    def __init__(self, url: str, connect_timeout: float = 10.0):
        self.url = url
        self.connect_timeout = connect_timeout
        self._lock = threading.Lock()
        self._conn = None

    def _connect(self):
        psycopg = _psycopg()
        try:
            return psycopg.connect(self.url, autocommit=True, connect_timeout=max(1, int(self.connect_timeout)))
        except psycopg.Error as e:
            raise StoreUnavailable(f"cannot reach the document store {redact(self.url)}: {e}") from None

    @contextmanager
    def tx(self, isolation: Optional[str] = None):
        """A cursor in one transaction, committed when the block ends (rolled back if it raises)."""
        psycopg = _psycopg()
        with self._lock:
            if self._conn is None or self._conn.closed or self._conn.broken:
                self._conn = self._connect()
            conn = self._conn
            try:
                conn.isolation_level = getattr(psycopg.IsolationLevel, isolation) if isolation else None
                with conn.transaction(), conn.cursor() as cur:
                    yield cur
            except psycopg.OperationalError as e:
                self._drop()
                raise StoreUnavailable(f"the document store {redact(self.url)} failed: {e}") from None

    def _drop(self) -> None:
        try:
            if self._conn is not None:
                self._conn.close()
        finally:
            self._conn = None

    def close(self) -> None:
        with self._lock:
            self._drop()


class PostgresStore:
    """Thread-safe: one connection behind a lock, each call its own transaction."""

    kind = "postgresql"

    def __init__(self, url: str, connect_timeout: float = 10.0):
        self.url = url
        self.db = PgConnection(url, connect_timeout)
        self._tx = self.db.tx
        with self._tx() as cur:  # two replicas starting at once must not race on CREATE
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
            cur.execute(_SCHEMA)
            cur.execute("INSERT INTO knowmux_meta VALUES ('store_id', %s) ON CONFLICT (key) DO NOTHING",
                        (uuid.uuid4().hex,))
            cur.execute("SELECT value FROM knowmux_meta WHERE key = 'store_id'")
            self.store_id = cur.fetchone()[0]

    def describe(self) -> str:
        return redact(self.url)

    def close(self) -> None:
        self.db.close()

    # -- reads ----------------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The newest change number (0: none yet)."""
        with self._tx() as cur:
            cur.execute("SELECT COALESCE(MAX(seq), 0) FROM knowmux_changes")
            return int(cur.fetchone()[0])

    def count(self) -> int:
        with self._tx() as cur:
            cur.execute("SELECT COUNT(*) FROM knowmux_documents")
            return int(cur.fetchone()[0])

    def hashes(self, ids: Iterable[str]) -> dict[str, str]:
        ids = list(ids)
        if not ids:
            return {}
        with self._tx() as cur:
            cur.execute("SELECT id, content_hash FROM knowmux_documents WHERE id = ANY(%s)", (ids,))
            return dict(cur.fetchall())

    def get(self, doc_id: str) -> Optional[Document]:
        return self.get_many([doc_id]).get(doc_id)

    def get_many(self, ids: list[str]) -> dict[str, Document]:
        if not ids:
            return {}
        with self._tx() as cur:
            cur.execute(f"SELECT {_COLUMNS} FROM knowmux_documents WHERE id = ANY(%s)", (list(ids),))
            return {r[0]: Document(*r) for r in cur.fetchall()}

    def page(self, after: Optional[str] = None, limit: int = 20) -> list[Document]:
        with self._tx() as cur:  # byte order, as SQLite compares ids
            cur.execute(f"SELECT {_COLUMNS} FROM knowmux_documents WHERE id COLLATE \"C\" > %s "
                        "ORDER BY id COLLATE \"C\" LIMIT %s", (after if after is not None else "", limit))
            return [Document(*r) for r in cur.fetchall()]

    def ids_with_hash(self, digest: str) -> list[str]:
        with self._tx() as cur:
            cur.execute("SELECT id FROM knowmux_documents WHERE content_hash = %s", (digest,))
            return [r[0] for r in cur.fetchall()]

    def ids_for_vec(self, vec_ids: list[int]) -> dict[int, str]:
        if not vec_ids:
            return {}
        with self._tx() as cur:
            cur.execute("SELECT vec_id, id FROM knowmux_documents WHERE vec_id = ANY(%s)", ([int(v) for v in vec_ids],))
            return dict(cur.fetchall())

    def all_embeddings(self, dim: int) -> tuple[np.ndarray, np.ndarray, int]:
        """(vec_ids, embeddings, generation), one consistent snapshot."""
        with self._tx("REPEATABLE_READ") as cur:
            cur.execute("SELECT COALESCE(MAX(seq), 0) FROM knowmux_changes")
            gen = int(cur.fetchone()[0])
            cur.execute("SELECT vec_id, embedding FROM knowmux_documents ORDER BY vec_id")
            rows = cur.fetchall()
        return _unpack(rows, dim) + (gen,)

    def changes_since(self, generation: int, dim: int):
        """What changed after ``generation``: (removed vec_ids, added vec_ids, their
        embeddings, the new generation), one consistent snapshot. An id added and removed
        again within the span is in ``removed`` only."""
        with self._tx("REPEATABLE_READ") as cur:
            cur.execute("SELECT seq, vec_id, added FROM knowmux_changes WHERE seq > %s ORDER BY seq", (generation,))
            log = cur.fetchall()
            if not log:
                return [], np.zeros(0, np.int64), np.zeros((0, dim), np.float32), generation
            removed = sorted({v for _, v, added in log if not added})
            added = sorted({v for _, v, a in log if a} - set(removed))
            cur.execute("SELECT vec_id, embedding FROM knowmux_documents WHERE vec_id = ANY(%s) ORDER BY vec_id",
                        (added,))
            ids, embs = _unpack(cur.fetchall(), dim)
        return removed, ids, embs, int(log[-1][0])

    # -- writes ---------------------------------------------------------------------------
    def upsert(self, docs: list[Document], embeddings: np.ndarray) -> list[tuple[int, Optional[int], str]]:
        """Insert or replace documents in one transaction: (new vec_id, old vec_id or None, id) each."""
        now, out, log = time.time(), [], []
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            for doc, emb in zip(docs, embeddings):
                cur.execute("DELETE FROM knowmux_documents WHERE id = %s RETURNING vec_id, created_at", (doc.id,))
                old = cur.fetchone()
                cur.execute(
                    "INSERT INTO knowmux_documents (id, title, text, content_hash, embedding, added_by, created_at,"
                    " updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) RETURNING vec_id",
                    (doc.id, doc.title, doc.text, doc.content_hash or content_hash(doc.title, doc.text),
                     np.asarray(emb, dtype=np.float32).tobytes(), doc.added_by, old[1] if old else now, now))
                new = int(cur.fetchone()[0])
                if old:
                    log.append((int(old[0]), False, now))
                log.append((new, True, now))
                out.append((new, int(old[0]) if old else None, doc.id))
            cur.executemany("INSERT INTO knowmux_changes (vec_id, added, at) VALUES (%s, %s, %s)", log)
        return out

    def delete(self, doc_id: str) -> Optional[int]:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_WRITE_LOCK,))
            cur.execute("DELETE FROM knowmux_documents WHERE id = %s RETURNING vec_id", (doc_id,))
            row = cur.fetchone()
            if row is not None:
                cur.execute("INSERT INTO knowmux_changes (vec_id, added, at) VALUES (%s, false, %s)",
                            (int(row[0]), time.time()))
        return int(row[0]) if row else None


def _unpack(rows, dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array([r[0] for r in rows], dtype=np.int64)
    embs = np.frombuffer(b"".join(bytes(r[1]) for r in rows), dtype=np.float32).reshape(len(rows), dim) if rows \
        else np.zeros((0, dim), dtype=np.float32)
    return ids, embs
