"""What the router knows about a request before choosing a strategy.

All of it comes from work the server does anyway: the question's embedding and the
retrieval it feeds (scores of the top-k hits), which of those documents have a stored
KV cache or a trained adapter, token counts for the latency estimates, and, when the
probe is on, whether the model grows less sure of its next token once the retrieved
passages are in the prompt (CK-PLUG's confidence gain, measured on the first token).

The classifier sees only ``vector()``: the embedding plus the numeric retrieval
features, which ``knowmux router train`` can recompute offline from a bench run's data
dir without the model. Availability of caches and adapters is a hard constraint
applied after the classifier, never a learned preference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

# the numeric features the classifier sees after the embedding, in this order
NUMERIC = ("top_score", "score_gap", "mean_score", "log_question_words")


@dataclass
class Features:
    embedding: Optional[np.ndarray]  # [dim] float32, normalised; None when no knowledge base
    scores: list[float] = field(default_factory=list)  # top-k retrieval scores, best first
    question_words: int = 0
    question_tokens: int = 0
    passage_tokens: int = 0  # sum over the top-k passages (rag's extra prefill)
    with_kv: int = 0  # of the top-k documents, how many have a stored KV cache
    with_adapter: int = 0  # ... and a trained adapter
    confidence_gain: Optional[float] = None  # H(no context) - H(context) at the first token; None = not probed

    @property
    def n_hits(self) -> int:
        return len(self.scores)

    @property
    def top_score(self) -> float:
        return self.scores[0] if self.scores else 0.0

    def numeric(self) -> list[float]:
        s = self.scores
        gap = s[0] - s[1] if len(s) > 1 else (s[0] if s else 0.0)
        mean = float(np.mean(s)) if s else 0.0
        return [self.top_score, gap, mean, math.log1p(self.question_words)]

    def vector(self) -> np.ndarray:
        emb = self.embedding if self.embedding is not None else np.zeros(0, np.float32)
        return np.concatenate([emb.astype(np.float32), np.asarray(self.numeric(), np.float32)])


def question_words(question: str) -> int:
    return len(question.split())
