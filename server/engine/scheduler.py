"""The continuous-batching policy: who waits, who runs, and which rows advance by how
many tokens in the next step.

Pure bookkeeping, no tensors. ``Scheduler`` owns the waiting queue and the running batch:
admission within the batch-size and KV-token limits, the twin rule (a request waits
for a running one that is prefilling most of its prompt), and background work's duty
cycle. ``plan_step`` chooses for each running row a number of pending tokens to feed,
within a per-step token budget. Decoding rows go
first (one token each, so a long prefill never stalls them); prefills then take what
is left of the budget in arrival order, chunked. A request with several rows (CK-PLUG's
pair) gets its logits only when all its rows finish their pending tokens in the same
step, so a row that would finish early holds its last token back.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Optional, Protocol, Sequence

from ..errors import QueueFull
from .prefix_cache import PrefixCache
from .types import WorkerLimits


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


class Scheduler:
    """The waiting queue and the running batch of one worker.

    Sequences are the worker's (they have ``req`` (a GenRequest), ``rows``, ``output``,
    ``cancelled``, ``done`` and ``t_admit``). Not thread-safe on its own: the worker holds
    its lock around every method that touches ``waiting`` (``enqueue``, ``admit``,
    ``take_cancelled``, ``drain``); ``running`` is touched on the engine thread only.
    """

    TWIN_MIN_TOKENS = 64  # shorter shared prompts are prefilled side by side (see twin_in_prefill)

    def __init__(self, limits: WorkerLimits, prefix_cache: Optional[PrefixCache] = None):
        self.limits, self.prefix_cache = limits, prefix_cache
        self.waiting: collections.deque = collections.deque()
        self.running: list = []
        self.kv_in_flight = 0  # KV slots reserved by running rows
        self.last_background = 0.0  # when background work last had its turn

    def enqueue(self, seq) -> None:
        """Queue ``seq``; raises QueueFull when ``max_queue`` are waiting."""
        if len(self.waiting) >= self.limits.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests are waiting (max_queue)", retry_after=1)
        self.waiting.append(seq)

    def take_cancelled(self) -> list:
        """Remove and return the waiting sequences that were cancelled."""
        gone = [s for s in self.waiting if s.cancelled]
        for seq in gone:
            self.waiting.remove(seq)
        return gone

    def admit(self) -> None:
        """Move waiting sequences into the running batch, in order, while the batch size
        and the KV-token budget allow; one waiting for a twin stays first in line."""
        deferred = []
        while self.waiting and len(self.running) < self.limits.max_batch_size:
            if self.twin_in_prefill(self.waiting[0]):
                deferred.append(self.waiting.popleft())
                continue
            need = self.waiting[0].req.kv_tokens_needed
            if self.kv_in_flight + need > self.limits.max_tokens_in_flight:
                break
            seq = self.waiting.popleft()
            self.kv_in_flight += need
            self.running.append(seq)
            seq.t_admit = time.perf_counter()
        self.waiting.extendleft(reversed(deferred))  # first in line once the twin's prompt is cached

    def twin_in_prefill(self, seq) -> bool:
        """Whether ``seq`` should wait for a running request that is prefilling the larger
        part of one of its prompts: that prompt's blocks enter the prefix cache at the
        twin's first token, and ``seq`` then prefills only the rest, where prefilling both
        at once would compute the shared part twice (n > 1 choices; `rag` beside
        `rag+ckplug` in one `strategies` request; clients repeating a question)."""
        if self.prefix_cache is None:
            return False
        block = self.prefix_cache.block
        mine = [r.prompt_ids for r in seq.req.rows if r.prefix is None and r.adapters is None]
        theirs = [r.prompt_ids for s in self.running if not s.output and not s.done for r in s.req.rows
                  if r.prefix is None and r.adapters is None]
        for ids in mine:
            # worth a wait: most of a long prompt, not a chat template's head before different questions
            floor = max(self.TWIN_MIN_TOKENS, 2 * block, len(ids) // 2)
            if len(ids) <= floor:
                continue
            for other in theirs:
                if ids[:floor] == other[:floor] and self.prefix_cache.cached_length(ids) < floor:
                    return True
        return False

    def remove(self, seq) -> None:
        """``seq`` left the running batch (finished, cancelled, failed): free its KV budget."""
        if seq in self.running:
            self.running.remove(seq)
            self.kv_in_flight -= seq.req.kv_tokens_needed

    def drain(self) -> list:
        """Everything queued or running (the engine is stopping): the queue is emptied, the
        running ones stay until the worker finishes them."""
        out = list(self.running) + list(self.waiting)
        self.waiting.clear()
        return out

    @property
    def busy(self) -> bool:
        """Live (not background) requests are running or waiting (from any thread; a snapshot)."""
        return any(not s.req.background for s in self.running) or any(not s.req.background for s in self.waiting)

    def background_due(self) -> bool:
        """Background work's turn while live requests run: one per ``background_interval_s``,
        shared by background calls (training pieces) and background rows (augmentation)."""
        return time.perf_counter() - self.last_background >= self.limits.background_interval_s

    def plannable(self) -> list:
        """The sequences this step advances. Background ones (build augmentation) yield to
        live ones: while a live request runs and none waits for a place, they join a step
        at most once per ``background_interval_s``, the same duty cycle as background calls
        (a live request queued behind them lets them run, to free their places)."""
        background = [s for s in self.running if s.req.background]
        if not background or len(background) == len(self.running) or \
                any(not s.req.background for s in self.waiting):
            return self.running
        if self.background_due():
            self.last_background = time.perf_counter()
            return self.running
        return [s for s in self.running if not s.req.background]

    def plan(self) -> list[RowPlan]:
        """The next step's rows and token counts (``plan_step`` over ``plannable()``)."""
        return plan_step(self.plannable(), self.limits.step_token_budget)
