"""Which rows advance by how many tokens in the next step (continuous batching policy).

Pure bookkeeping, no tensors: given the running sequences, choose for each row a
number of pending tokens to feed, within a per-step token budget. Decoding rows go
first (one token each, so a long prefill never stalls them); prefills then take what
is left of the budget in arrival order, chunked. A request with several rows (CK-PLUG's
pair) gets its logits only when all its rows finish their pending tokens in the same
step, so a row that would finish early holds its last token back.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence


class RowLike(Protocol):
    pending: list[int]


class SeqLike(Protocol):
    rows: list  # list[RowLike]


@dataclass
class RowPlan:
    seq: object
    row: object
    n: int
    want_logits: bool


def plan_step(running: Sequence[SeqLike], budget: int) -> list[RowPlan]:
    """Every running sequence needs at least one pending token in each row (the worker
    guarantees it); then the plan is never empty: if the budget is too small for any
    prefill to move (a pair whose held-back row eats it), the first prefill takes
    what it needs to move, as decodes do, since the budget is a soft cap."""
    decoding = [s for s in running if all(len(r.pending) == 1 for r in s.rows)]
    prefilling = [s for s in running if not all(len(r.pending) == 1 for r in s.rows)]
    plans: list[RowPlan] = []
    left = budget
    for s in decoding:  # always advance: budget is a soft cap for prefill only
        plans.extend(RowPlan(s, r, 1, True) for r in s.rows)
        left -= len(s.rows)
    for s in prefilling:
        if left <= 0:
            break
        plans.extend(_prefill(s, left))
        left = budget - sum(p.n for p in plans)
    if not plans and prefilling:
        s = prefilling[0]
        plans = _prefill(s, sum(len(r.pending) for r in s.rows))
    return plans


def _prefill(s: SeqLike, left: int) -> list[RowPlan]:
    """The rows of one prefilling sequence within ``left`` tokens."""
    takes = []
    for r in s.rows:
        n = min(len(r.pending), max(left, 0))
        left -= n
        takes.append([r, n])
    finishing = all(n == len(r.pending) for r, n in takes)
    plans = []
    for r, n in takes:
        if not finishing and n == len(r.pending):
            n -= 1  # hold the last token until every row of the request can finish
        if n > 0:
            plans.append(RowPlan(s, r, n, finishing))
    return plans
