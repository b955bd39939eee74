"""Scoring, as the evaluation data's README prescribes.

Answers are normalised as SQuAD does (lower case, strip punctuation and the articles
a/an/the, collapse white space). Per output and alias list: exact match, token F1 (the
best over aliases) and containment (a normalised alias appears in the normalised
output; small models answer in sentences). On conflict sets, with po and ps the number
of outputs containing a memory answer and a context answer over N questions:
memory recall MR = po / (po + ps) (None when po + ps = 0), po/N and context recall ps/N.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Iterable, Optional

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize(text: str) -> str:
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(output: str, answers: Iterable[str]) -> float:
    out = normalize(output)
    return float(any(out == normalize(a) for a in answers))


def _f1(pred: str, gold: str) -> float:
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)
    common = Counter(p) & Counter(g)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1(output: str, answers: Iterable[str]) -> float:
    return max((_f1(output, a) for a in answers), default=0.0)


def contains(output: str, answers: Iterable[str]) -> float:
    out = f" {normalize(output)} "
    return float(any(normalize(a) and f" {normalize(a)} " in out for a in answers))


def conflict_scores(outputs_and_answers: list[tuple[str, list[str], list[str]]]) -> dict:
    """outputs_and_answers: (output, memory_answers, context_answers) per question."""
    n = len(outputs_and_answers)
    po = sum(contains(o, mem) > 0 for o, mem, _ in outputs_and_answers)
    ps = sum(contains(o, ctx) > 0 for o, _, ctx in outputs_and_answers)
    return {"n": n, "po": po, "ps": ps, "memory_recall": po / (po + ps) if po + ps else None,
            "memory_rate": po / n if n else None, "context_recall": ps / n if n else None}


def percentile(values: list[float], q: float) -> Optional[float]:
    """Linear interpolation between closest ranks (numpy's default), q in [0, 100]."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def recall_at_k(retrieved: list[str], gold: list[str]) -> Optional[float]:
    """Share of gold documents among the retrieved ones (None when the set names none)."""
    if not gold:
        return None
    return len(set(retrieved) & set(gold)) / len(set(gold))
