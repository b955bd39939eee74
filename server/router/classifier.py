"""The learned part of the router: a softmax regression from request features to the
cheapest strategy expected to answer correctly (Adaptive-RAG's labelling, Jeong et al. 2024).

Stored in the data dir as ``router/classifier.safetensors`` (weights and feature
scaling) beside ``router/classifier.json`` (classes, feature layout, how it was
trained); nothing that can run code when loaded. Small on purpose: a few hundred
labelled questions do not support more than a linear model over the embedding.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from indexes.atomic import atomic_write_bytes

from .features import NUMERIC

log = logging.getLogger(__name__)

WEIGHTS, META = "classifier.safetensors", "classifier.json"
FORMAT = 1


class ClassifierError(ValueError):
    pass


@dataclass
class RouterClassifier:
    classes: list[str]
    W: np.ndarray  # [C, D]
    b: np.ndarray  # [C]
    mean: np.ndarray  # [D]
    std: np.ndarray  # [D]
    embedding_dim: int
    info: dict = field(default_factory=dict)  # training provenance, shown by /v1/router

    # ---- use -------------------------------------------------------------------------
    def probabilities(self, x: np.ndarray) -> np.ndarray:
        if x.shape != self.mean.shape:
            raise ClassifierError(f"feature vector has {x.shape[0]} values, the classifier expects "
                                  f"{self.mean.shape[0]} (embedding dim {self.embedding_dim} + {len(NUMERIC)})")
        z = self.W @ ((x - self.mean) / self.std) + self.b
        z = z - z.max()
        p = np.exp(z)
        return p / p.sum()

    def choose(self, x: np.ndarray, allowed: list[str]) -> Optional[tuple[str, float]]:
        """The most probable allowed class and its probability renormalised over the allowed
        ones; None when no class is allowed."""
        p = self.probabilities(x)
        idx = [i for i, c in enumerate(self.classes) if c in allowed]
        if not idx:
            return None
        sub = p[idx] / max(p[idx].sum(), 1e-12)
        j = int(np.argmax(sub))
        return self.classes[idx[j]], float(sub[j])

    # ---- training --------------------------------------------------------------------
    @classmethod
    def fit(cls, X: np.ndarray, labels: list[str], classes: list[str], embedding_dim: int,
            l2: float = 1e-2, steps: int = 800, lr: float = 0.5, seed: int = 0, info: Optional[dict] = None
            ) -> "RouterClassifier":
        """Full-batch gradient descent on the L2-regularised cross-entropy, classes weighted
        by inverse frequency (so a rare cheap class is not drowned by the common one)."""
        if len(X) != len(labels) or len(X) == 0:
            raise ClassifierError("need one label per feature row and at least one row")
        y = np.array([classes.index(c) for c in labels])
        mean = X.mean(0)
        std = X.std(0)
        std = np.where(std < 1e-4, 1.0, std)  # a constant feature stays as it is instead of exploding
        Z = (X - mean) / std
        n, d = Z.shape
        C = len(classes)
        counts = np.bincount(y, minlength=C).astype(np.float64)
        w_class = np.where(counts > 0, n / (C * np.maximum(counts, 1)), 0.0)
        sw = w_class[y] / w_class[y].sum()
        rng = np.random.default_rng(seed)
        W = rng.normal(0, 0.01, (C, d))
        b = np.zeros(C)
        onehot = np.eye(C)[y]
        for _ in range(steps):
            logits = Z @ W.T + b
            logits -= logits.max(1, keepdims=True)
            P = np.exp(logits)
            P /= P.sum(1, keepdims=True)
            G = (P - onehot) * sw[:, None]  # d loss / d logits
            W -= lr * (G.T @ Z + l2 * W)
            b -= lr * G.sum(0)
        return cls(list(classes), W.astype(np.float32), b.astype(np.float32), mean.astype(np.float32),
                   std.astype(np.float32), embedding_dim, dict(info or {}))

    # ---- storage ---------------------------------------------------------------------
    def save(self, folder: Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(folder / WEIGHTS, st_save({"W": self.W, "b": self.b, "mean": self.mean, "std": self.std}))
        meta = {"format": FORMAT, "classes": self.classes, "embedding_dim": self.embedding_dim,
                "numeric_features": list(NUMERIC), "info": self.info}
        atomic_write_bytes(folder / META, json.dumps(meta, indent=1).encode())

    @classmethod
    def load(cls, folder: Path) -> Optional["RouterClassifier"]:
        """The stored classifier, None when there is none; ClassifierError when it is unusable."""
        folder = Path(folder)
        if not (folder / META).exists() and not (folder / WEIGHTS).exists():
            return None
        try:
            meta = json.loads((folder / META).read_text())
            t = st_load((folder / WEIGHTS).read_bytes())
            W, b, mean, std = t["W"], t["b"], t["mean"], t["std"]
        except (OSError, ValueError, KeyError, Exception) as e:  # safetensors raises its own error type
            raise ClassifierError(f"router classifier in {folder} is unreadable: {e}") from None
        if meta.get("format") != FORMAT or meta.get("numeric_features") != list(NUMERIC):
            raise ClassifierError(f"router classifier in {folder} has another format or feature layout; "
                                  "retrain it with knowmux router train")
        C, D = len(meta["classes"]), meta["embedding_dim"] + len(NUMERIC)
        if W.shape != (C, D) or b.shape != (C,) or mean.shape != (D,) or std.shape != (D,):
            raise ClassifierError(f"router classifier in {folder} has inconsistent shapes")
        if not all(np.isfinite(a).all() for a in (W, b, mean, std)) or (std <= 0).any():
            raise ClassifierError(f"router classifier in {folder} holds non-finite values")
        return cls(meta["classes"], W, b, mean, std, meta["embedding_dim"], meta.get("info", {}))
