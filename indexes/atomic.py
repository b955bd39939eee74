"""Writing files and folders so that a reader sees the old version or the new one, never
half of either: write beside the target, fsync, rename over it. Shared by every store
(documents, FAISS, KV caches, adapters, jobs, the router's classifier, the model folder)."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


@contextmanager
def atomic_folder(target: Path, prefix: str = ".tmp-") -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; when the block ends without an
    exception its files are fsynced and it replaces ``target`` (an older ``target`` is
    removed first). On an exception the temporary folder is removed and ``target`` is
    left as it was. ``prefix`` names the temporary folder, so that a store's listing can
    skip one a crash left behind."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=target.parent))
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
