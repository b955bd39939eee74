"""The engine worker: one thread that owns the model and steps the running batch.

Requests are submitted from any thread (the HTTP event loop, a build job) with a
``sink`` callback that receives ``TokenEvent``s on the engine thread. Between steps
the worker drops cancelled sequences, admits waiting ones while the batch-size and
KV-token limits allow, plans a step (scheduler.plan_step), runs one packed forward,
samples one token for every sequence whose rows all produced logits, and emits.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from ..errors import EngineUnavailable, InvalidRequest, QueueFull
from .compute import ComputeThread
from .detok import IncrementalDetokenizer
from .kvcache import RowCache
from .model import LlamaRunner, Segment
from .prefix_cache import PrefixCache
from .sampling import adjust, sample, token_logprob
from .scheduler import plan_step
from .types import GenRequest, RowSpec, Timings, TokenEvent

log = logging.getLogger(__name__)

Sink = Callable[[TokenEvent], None]


@dataclass(frozen=True)
class WorkerLimits:
    max_batch_size: int = 16  # sequences in the running batch
    max_tokens_in_flight: int = 32768  # KV slots reserved by running rows (46 KB each on SmolLM2 fp32)
    max_queue: int = 64  # sequences waiting for admission; more get QueueFull (429)
    step_token_budget: int = 512  # tokens per forward pass (prefill chunk size)
    prefix_cache_tokens: int = 16384  # automatic prefix cache (0 = off); 46 KB per token on SmolLM2 fp32
    prefix_cache_block: int = 16  # tokens per prefix-cache block (a prompt shares whole blocks only)
    background_interval_s: float = 1.0  # while requests run, at most one background call (a training step) per interval
    # KV slot size of the shared pool (2 slots per batch place); a longer row gets a private cache
    pool_row_tokens: int = 2048


@dataclass(eq=False)
class _Row:
    spec: RowSpec
    cache: RowCache
    pending: list[int]


@dataclass(eq=False)  # identity: the running list removes exactly this sequence
class _Seq:
    req: GenRequest
    sink: Sink
    detok: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    t_submit: float
    rows: list[_Row] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_admit: float = 0.0
    t_first: float = 0.0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache

    @property
    def prompt_tokens(self) -> int:
        r = self.req.rows[0]
        return len(r.prompt_ids) + (r.prefix.length if r.prefix is not None else 0)


class Handle:
    """What ``submit`` returns: lets the caller cancel (thread-safe, idempotent)."""

    def __init__(self, worker: "EngineWorker", seq: _Seq):
        self._worker, self._seq = worker, seq

    def cancel(self) -> None:
        if not self._seq.done:
            self._seq.cancelled = True
            self._worker._wake()


class LoopThread:
    """The one thread that owns an engine: start, stop, and whether it still runs.
    Subclasses provide ``_loop`` and set ``_cv`` (a Condition), ``_stop`` and ``_thread``."""

    thread_name = "knowmux-engine"
    _loop_job: Optional[Future] = None

    def start(self, on: Optional[ComputeThread] = None) -> None:
        """Run the loop on a thread of its own, or as a job of ``on`` (the thread that
        loaded the model: see server.engine.compute). Once: a second start (a second
        runtime around the same engine) must not add a second loop stepping it."""
        if self._thread is not None:
            return
        if on is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        else:
            self._thread = on.thread
            self._loop_job = on.submit(self._loop)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._loop_job is not None:
            futures.wait([self._loop_job], timeout=30)
        elif self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def on_engine_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped or died (never started counts as alive:
        tests step a worker by hand)."""
        if self._stop or (self._loop_job is not None and self._loop_job.done()):
            return False
        return self._thread is None or self._thread.is_alive()


class EngineWorker(LoopThread):
    TWIN_MIN_TOKENS = 64  # shorter shared prompts are prefilled side by side (see _twin_in_prefill)
    CALLS_PER_STEP_S = 0.02  # live calls run back to back between two steps for up to this long

    def __init__(self, runner: LlamaRunner, tokenizer, eos_ids: set[int], limits: WorkerLimits,
                 on_step: Optional[Callable[[int, int, float], None]] = None):
        self.runner, self.tokenizer, self.eos_ids, self.limits = runner, tokenizer, eos_ids, limits
        self.on_step = on_step  # (tokens, rows, seconds) after every forward; for metrics
        self._cv = threading.Condition()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._background: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._last_background = 0.0
        self._running: list[_Seq] = []
        self._kv_in_flight = 0
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self.steps = 0
        self.last_step_tokens = 0
        self.prefix_cache = PrefixCache(limits.prefix_cache_block, limits.prefix_cache_tokens) \
            if limits.prefix_cache_tokens else None
        # Row caches come from one pool so that decode rows attend in one batched call; two
        # slots per place in the batch (CK-PLUG requests run two rows). Pages are committed
        # only as slots fill, lowest slots first.
        self.kv_pool = runner.new_pool(2 * limits.max_batch_size, limits.pool_row_tokens) \
            if limits.pool_row_tokens else None

    # ---- any thread -------------------------------------------------------------
    def submit(self, req: GenRequest, sink: Sink) -> Handle:
        """Queue a request. Raises InvalidRequest (cannot ever fit), QueueFull, EngineUnavailable."""
        if not req.rows or any(not r.prompt_ids for r in req.rows):
            raise InvalidRequest("every row needs at least one prompt token")
        req.sampling.check_vocabulary(self.runner.vocab_size)
        if req.kv_tokens_needed > self.limits.max_tokens_in_flight:
            raise InvalidRequest(
                f"request needs {req.kv_tokens_needed} KV slots, more than this server's "
                f"max_tokens_in_flight ({self.limits.max_tokens_in_flight}); lower max_tokens or top_k")
        gen = None
        if req.sampling.temperature > 0:
            gen = torch.Generator()
            gen.manual_seed(req.sampling.seed if req.sampling.seed is not None else
                            int.from_bytes(os.urandom(8), "little") >> 1)
        seq = _Seq(req, sink, IncrementalDetokenizer(self.tokenizer, req.sampling.stop), gen, time.perf_counter())
        with self._cv:
            if not self.alive:
                raise EngineUnavailable(self.last_error or "the engine is not running", retry_after=5)
            if len(self._waiting) >= self.limits.max_queue:
                raise QueueFull(f"{len(self._waiting)} requests are waiting (max_queue)", retry_after=1)
            self._waiting.append(seq)
            self._cv.notify()
        return Handle(self, seq)

    def call(self, fn: Callable[[], object], background: bool = False) -> Future:
        """Run ``fn()`` on the engine thread at the next step boundary (calls queued together
        run back to back for up to ``CALLS_PER_STEP_S``, then the batch gets a step, so live
        requests keep decoding between long calls); its result or exception lands in the
        returned Future. On a worker that was never started, runs it at once.

        ``background`` calls (adapter training steps, long and many) yield to serving: they
        run at once when nothing is decoding, otherwise at most one per
        ``limits.background_interval_s``, so a build slows live requests by a bounded duty
        cycle instead of putting a training step between every two decode steps."""
        fut: Future = Future()
        if self._thread is None:
            self._run_call(fn, fut)
            return fut
        with self._cv:
            if not self.alive:
                raise EngineUnavailable(self.last_error or "the engine is not running", retry_after=5)
            (self._background if background else self._calls).append((fn, fut))
            self._cv.notify()
        return fut

    @staticmethod
    def _run_call(fn, fut: Future) -> None:
        if not fut.set_running_or_notify_cancel():
            return
        try:
            fut.set_result(fn())
        except BaseException as exc:  # handed to the caller, never kills the engine
            fut.set_exception(exc)

    def stats(self) -> dict:
        return {"queue": len(self._waiting), "running": len(self._running), "kv_in_flight": self._kv_in_flight,
                "steps": self.steps, "last_step_tokens": self.last_step_tokens,
                "kv_pool_free_slots": self.kv_pool.free_slots if self.kv_pool is not None else 0}

    @property
    def busy(self) -> bool:
        """Live (not background) requests are running or waiting (from any thread; a snapshot)."""
        return any(not s.req.background for s in self._running) or any(not s.req.background for s in self._waiting)

    def _wake(self) -> None:
        with self._cv:
            self._cv.notify()

    # ---- engine thread ----------------------------------------------------------
    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # the thread is dying: say so, and answer everyone still waiting
            self.last_error = f"engine thread died: {type(exc).__name__}: {exc}"
            log.critical(self.last_error, exc_info=True)
            raise
        finally:
            with self._cv:
                self._stop = True
                stranded = list(self._running) + list(self._waiting)
                self._waiting.clear()
                calls = list(self._calls) + list(self._background)
                self._calls.clear()
                self._background.clear()
            for _, fut in calls:
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(EngineUnavailable(self.last_error or "engine shut down"))
            for seq in stranded:
                self._finish(seq, "error", error=self.last_error or "engine shut down")

    def _serve(self) -> None:
        while True:
            with self._cv:
                while (not self._stop and not self._waiting and not self._running and not self._calls
                       and not self._background):
                    self._cv.wait()
                if self._stop:
                    break
                call = self._calls.popleft() if self._calls else None
                background = False
                if call is None and self._background and (not self.busy or self._background_due()):
                    call, background = self._background.popleft(), True
            t0 = time.perf_counter()
            while call is not None:
                self._run_call(*call)
                if background:  # the interval counts from the end of a background call
                    self._last_background = time.perf_counter()
                    break
                # short live calls (query embeddings, a few ms each) run together between two
                # steps; after a long one (a passage's KV prefill) the batch gets its step
                if time.perf_counter() - t0 >= self.CALLS_PER_STEP_S:
                    break
                with self._cv:
                    call = self._calls.popleft() if self._calls else None
            self.step()

    def step(self) -> bool:
        """Drop cancelled sequences, admit waiting ones, run one forward and sample.
        Returns False when there was nothing to run. Called by the engine thread (tests
        call it directly on a worker that was never started)."""
        self._drop_cancelled()
        self._admit()
        if not self._running:
            return False
        try:
            self._forward_and_sample()
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            self.last_error = f"engine step failed: {type(exc).__name__}: {exc}"
            for seq in list(self._running):
                self._finish(seq, "error", error=self.last_error)
        return True

    def _drop_cancelled(self) -> None:
        with self._cv:
            for seq in [s for s in self._waiting if s.cancelled]:
                self._waiting.remove(seq)
                seq.done = True
        for seq in [s for s in self._running if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._cv:
            deferred = []
            while self._waiting and len(self._running) < self.limits.max_batch_size:
                if self._twin_in_prefill(self._waiting[0]):
                    deferred.append(self._waiting.popleft())
                    continue
                need = self._waiting[0].req.kv_tokens_needed
                if self._kv_in_flight + need > self.limits.max_tokens_in_flight:
                    break
                seq = self._waiting.popleft()
                self._kv_in_flight += need
                self._running.append(seq)
                seq.t_admit = time.perf_counter()
            self._waiting.extendleft(reversed(deferred))  # first in line once the twin's prompt is cached
        for seq in list(self._running):
            if not seq.rows:
                try:
                    self._allocate(seq)
                except Exception as exc:  # e.g. an injected prefix that does not fit: fail this request only
                    log.warning("could not admit %s: %s", seq.req.request_id, exc)
                    self._finish(seq, "error", error=f"could not admit the request: {exc}")

    def _twin_in_prefill(self, seq: _Seq) -> bool:
        """Whether ``seq`` should wait for a running request that is prefilling the larger
        part of one of its prompts: that prompt's blocks enter the prefix cache at the
        twin's first token, and ``seq`` then prefills only the rest, where prefilling both
        at once would compute the shared part twice (n > 1 choices; `rag` beside
        `rag+ckplug` in one `strategies` request; clients repeating a question)."""
        if self.prefix_cache is None:
            return False
        block = self.prefix_cache.block
        mine = [r.prompt_ids for r in seq.req.rows if r.prefix is None and r.adapters is None]
        theirs = [r.prompt_ids for s in self._running if not s.output and not s.done for r in s.req.rows
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

    def _allocate(self, seq: _Seq) -> None:
        for spec in seq.req.rows:
            pre = spec.prefix.length if spec.prefix is not None else 0
            capacity = pre + len(spec.prompt_ids) + seq.req.sampling.max_tokens
            cache = (self.kv_pool.acquire(capacity) if self.kv_pool is not None else None) \
                or self.runner.new_cache(capacity)
            prefix = spec.prefix
            if prefix is None and spec.adapters is None and self.prefix_cache is not None:
                prefix = self.prefix_cache.lookup(spec.prompt_ids)
                seq.cached_tokens += prefix.length if prefix is not None and spec is seq.req.rows[0] else 0
                pending = spec.prompt_ids[prefix.length:] if prefix is not None else list(spec.prompt_ids)
            else:
                pending = list(spec.prompt_ids)
            if prefix is not None:
                cache.import_prefix(prefix)
            seq.rows.append(_Row(spec, cache, pending))

    def _forward_and_sample(self) -> None:
        t0 = time.perf_counter()
        for seq in [s for s in self._running if not s.rows or any(not r.pending for r in s.rows)]:
            # a broken invariant (every running row has a token to feed): fail this request alone, loudly
            log.error("request %s has rows with nothing to feed (pending %s); failing it",
                      seq.req.request_id, [len(r.pending) for r in seq.rows])
            self._finish(seq, "error", error="internal error: the request had nothing left to compute")
        plans = plan_step(self._plannable(), self.limits.step_token_budget)
        if not plans:
            return
        ids: list[int] = []
        segments: list[Segment] = []
        for p in plans:
            segments.append(Segment(p.row.cache, len(ids), p.n, p.row.spec.adapters, p.want_logits))
            ids.extend(p.row.pending[:p.n])
            p.row.pending = p.row.pending[p.n:]
        logits = self.runner.forward(torch.tensor(ids, dtype=torch.long), segments)
        # logits lines follow the plans that want them; group them per sequence
        per_seq: dict[int, list] = {}
        line = 0
        for p in plans:
            if p.want_logits:
                per_seq.setdefault(id(p.seq), [p.seq]).append(logits[line])
                line += 1
        for seq, *rows in per_seq.values():
            self._emit_token(seq, torch.stack(rows))
        self.steps += 1
        self.last_step_tokens = len(ids)
        if self.on_step is not None:
            self.on_step(len(ids), len(segments), time.perf_counter() - t0)

    def _plannable(self) -> list[_Seq]:
        """The sequences this step advances. Background ones (build augmentation) yield to
        live ones: while a live request runs and none waits for a place, they join a step
        at most once per ``background_interval_s``, the same duty cycle as background calls
        (a live request queued behind them lets them run, to free their places)."""
        background = [s for s in self._running if s.req.background]
        if not background or len(background) == len(self._running) or \
                any(not s.req.background for s in self._waiting):
            return self._running
        if self._background_due():
            self._last_background = time.perf_counter()
            return self._running
        return [s for s in self._running if not s.req.background]

    def _background_due(self) -> bool:
        """Background work's turn while live requests run: one per ``background_interval_s``,
        shared by background calls (training pieces) and background rows (augmentation)."""
        return time.perf_counter() - self._last_background >= self.limits.background_interval_s

    def _emit_token(self, seq: _Seq, logits: torch.Tensor) -> None:
        final = seq.req.logits_hook(logits) if seq.req.logits_hook is not None else logits[0]
        tok = sample(adjust(final, seq.req.sampling, seq.output), seq.req.sampling, seq.generator)
        k = seq.req.sampling.logprobs
        lps = [token_logprob(final, tok, k)] if k is not None else []
        now = time.perf_counter()
        if not seq.output:
            seq.t_first = now
            if self.prefix_cache is not None:  # the prompts are in the caches now: share their blocks
                for row in seq.rows:
                    if row.spec.prefix is None and row.spec.adapters is None:
                        self.prefix_cache.insert(row.spec.prompt_ids, row.cache)
        seq.output.append(tok)
        if tok in self.eos_ids and not seq.req.sampling.ignore_eos:
            self._finish(seq, "stop", token_ids=[tok], logprobs=lps)
            return
        text = seq.detok.add(tok)
        if seq.detok.stopped:
            self._finish(seq, "stop", text, token_ids=[tok], logprobs=lps)
        elif len(seq.output) >= seq.req.sampling.max_tokens:
            self._finish(seq, "length", text + seq.detok.flush(), token_ids=[tok], logprobs=lps)
        else:
            try:
                seq.sink(TokenEvent(text, [tok], logprobs=lps))
            except Exception:  # the consumer is gone (closed loop): stop generating for it
                log.warning("sink failed for %s; cancelling", seq.req.request_id)
                self._finish(seq, "cancelled")
                return
            for row in seq.rows:
                row.pending = [tok]

    def _finish(self, seq: _Seq, reason: str, text: str = "", error: Optional[str] = None,
                token_ids: Optional[list[int]] = None, logprobs: Optional[list] = None) -> None:
        if seq.done:
            return
        seq.done = True
        if seq in self._running:
            self._running.remove(seq)
            self._kv_in_flight -= seq.req.kv_tokens_needed
        if self.kv_pool is not None:
            for row in seq.rows:
                self.kv_pool.release(row.cache)
        seq.rows = []  # frees the KV cache at once
        now = time.perf_counter()
        timings = Timings.between(seq.t_submit, seq.t_admit or now, seq.t_first or now, now)
        if reason != "error" and not text:
            text = seq.detok.flush()
        try:
            seq.sink(TokenEvent(text, token_ids or [], finish_reason=reason, prompt_tokens=seq.prompt_tokens,
                                completion_tokens=len(seq.output), timings=timings, error=error,
                                cached_tokens=seq.cached_tokens, logprobs=logprobs or []))
        except Exception:
            log.exception("sink failed for %s", seq.req.request_id)
