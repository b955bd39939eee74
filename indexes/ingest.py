"""Reading documents (the generic corpus format) and ingesting them in batches.

Corpus format, JSON lines, UTF-8: {"id": str, "title": str (optional), "text": str}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

from .store import Document

MAX_ID_CHARS = 256


class DocumentError(ValueError):
    """A document that cannot be ingested. ``too_large`` distinguishes 413 from 400."""

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


def validate_document(raw: object, max_chars: int, where: str = "document", added_by: str = "") -> Document:
    if not isinstance(raw, dict):
        raise DocumentError(f"{where}: expected an object with id and text")
    doc_id, text, title = raw.get("id"), raw.get("text"), raw.get("title") or ""
    if isinstance(doc_id, int) and not isinstance(doc_id, bool):
        doc_id = str(doc_id)
    if not isinstance(doc_id, str) or not doc_id.strip():
        raise DocumentError(f"{where}: 'id' must be a non-empty string")
    if len(doc_id) > MAX_ID_CHARS or any(ord(c) < 32 for c in doc_id):
        raise DocumentError(f"{where}: 'id' must be at most {MAX_ID_CHARS} characters without control characters")
    if not isinstance(title, str):
        raise DocumentError(f"{where}: 'title' must be a string")
    if not isinstance(text, str) or not text.strip():
        raise DocumentError(f"{where} {doc_id!r}: 'text' must be a non-empty string")
    if len(text) + len(title) > max_chars:
        raise DocumentError(f"{where} {doc_id!r}: {len(text) + len(title)} characters, over the limit of {max_chars}",
                            too_large=True)
    return Document(id=doc_id, text=text, title=title, added_by=added_by)


def read_corpus(path: Path, max_chars: int = 100_000) -> list[Document]:
    """Read and validate a whole corpus file first, so a bad line stops the run before any write."""
    docs = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as e:
                raise DocumentError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
            docs.append(validate_document(raw, max_chars, where=f"{path}:{lineno}"))
    return docs


@dataclass
class IngestReport:
    created: int = 0
    updated: int = 0
    unchanged: int = 0


def ingest(kb, docs: list[Document], batch_size: int = 64, progress: bool = True,
           desc: Optional[str] = "ingest") -> IngestReport:
    """Upsert in batches; each batch is one transaction (acknowledged once it returns)."""
    from tqdm import tqdm

    report = IngestReport()
    bar = tqdm(total=len(docs), desc=desc, unit="doc", disable=not progress)
    for batch in _batches(docs, batch_size):
        for _, status in kb.upsert(batch):
            setattr(report, status, getattr(report, status) + 1)
        bar.update(len(batch))
    bar.close()
    return report


def _batches(items: list, n: int) -> Iterable[list]:
    for i in range(0, len(items), n):
        yield items[i:i + n]
