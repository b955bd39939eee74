"""The engine worker: one thread that owns the model and steps the running batch.

Requests are submitted from any thread (the HTTP event loop, a build job) with a
``sink`` callback that receives ``TokenEvent``s on the engine thread. Between steps
the worker drops cancelled sequences, lets its ``Scheduler`` admit waiting ones and
plan a step, runs one packed forward, samples one token for every sequence whose rows
all produced logits, and emits.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional

import torch

from ..errors import EngineUnavailable, InvalidRequest
from .detok import IncrementalDetokenizer
from .loop import LoopThread
from .model import LlamaRunner, Segment
from .prefix_cache import PrefixCache
from .sampling import adjust, sample, token_logprob
from .scheduler import Scheduler
from .sequence import Handle, Row, Sequence
from .types import GenRequest, Sink, Timings, TokenEvent, WorkerLimits

log = logging.getLogger(__name__)


class EngineWorker(LoopThread):
    CALLS_PER_STEP_S = 0.02  # live calls run back to back between two steps for up to this long

    def __init__(self, runner: LlamaRunner, tokenizer, eos_ids: set[int], limits: WorkerLimits,
                 on_step: Optional[Callable[[int, int, float], None]] = None):
        self.runner, self.tokenizer, self.eos_ids, self.limits = runner, tokenizer, eos_ids, limits
        self.on_step = on_step  # (tokens, rows, seconds) after every forward; for metrics
        self._cv = threading.Condition()  # guards the scheduler's waiting queue and the call queues
        self._calls: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._background: collections.deque[tuple[Callable, Future]] = collections.deque()
        self._stop = False
        self._thread: Optional[threading.Thread] = None
        self.last_error: Optional[str] = None
        self.steps = 0
        self.last_step_tokens = 0
        self.prefix_cache = PrefixCache(limits.prefix_cache_block, limits.prefix_cache_tokens) \
            if limits.prefix_cache_tokens else None
        self.scheduler = Scheduler(limits, self.prefix_cache)
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
        for r in req.rows:
            if r.recompute is not None:
                try:
                    r.recompute.check(r.prefix.length if r.prefix is not None else 0)
                except ValueError as exc:
                    raise InvalidRequest(str(exc)) from None
        req.sampling.check_vocabulary(self.runner.vocab_size)
        if req.kv_tokens_needed > self.limits.max_tokens_in_flight:
            raise InvalidRequest(
                f"request needs {req.kv_tokens_needed} KV slots, more than this server's "
                f"max_tokens_in_flight ({self.limits.max_tokens_in_flight}); lower max_tokens or top_k")
        gen = None
        if req.sampling.temperature > 0:
            gen = torch.Generator(device=self.runner.device)  # draws where the logits are
            gen.manual_seed(req.sampling.seed if req.sampling.seed is not None else
                            int.from_bytes(os.urandom(8), "little") >> 1)
        seq = Sequence(req, sink, IncrementalDetokenizer(self.tokenizer, req.sampling.stop), gen, time.perf_counter())
        with self._cv:
            if not self.alive:
                raise EngineUnavailable(self.last_error or "the engine is not running", retry_after=5)
            self.scheduler.enqueue(seq)
            self._cv.notify()
        return Handle(self._wake, seq)

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
        sch = self.scheduler
        return {"queue": len(sch.waiting), "running": len(sch.running), "kv_in_flight": sch.kv_in_flight,
                "steps": self.steps, "last_step_tokens": self.last_step_tokens,
                "kv_pool_free_slots": self.kv_pool.free_slots if self.kv_pool is not None else 0}

    @property
    def busy(self) -> bool:
        """Live (not background) requests are running or waiting (from any thread; a snapshot)."""
        return self.scheduler.busy

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
                stranded = self.scheduler.drain()
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
                while (not self._stop and not self.scheduler.waiting and not self.scheduler.running
                       and not self._calls and not self._background):
                    self._cv.wait()
                if self._stop:
                    break
                call = self._calls.popleft() if self._calls else None
                background = False
                if call is None and self._background and (not self.busy or self.scheduler.background_due()):
                    call, background = self._background.popleft(), True
            t0 = time.perf_counter()
            while call is not None:
                self._run_call(*call)
                if background:  # the interval counts from the end of a background call
                    self.scheduler.last_background = time.perf_counter()
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
        if not self.scheduler.running:
            return False
        try:
            self._forward_and_sample()
        except Exception as exc:  # a failed step fails its requests, not the server
            log.exception("engine step failed")
            self.last_error = f"engine step failed: {type(exc).__name__}: {exc}"
            for seq in list(self.scheduler.running):
                self._finish(seq, "error", error=self.last_error)
        return True

    def _drop_cancelled(self) -> None:
        with self._cv:
            for seq in self.scheduler.take_cancelled():
                seq.done = True
        for seq in [s for s in self.scheduler.running if s.cancelled]:
            self._finish(seq, "cancelled")

    def _admit(self) -> None:
        with self._cv:
            self.scheduler.admit()
        for seq in list(self.scheduler.running):
            if not seq.rows:
                try:
                    self._allocate(seq)
                except Exception as exc:  # e.g. an injected prefix that does not fit: fail this request only
                    log.warning("could not admit %s: %s", seq.req.request_id, exc)
                    self._finish(seq, "error", error=f"could not admit the request: {exc}")

    def _allocate(self, seq: Sequence) -> None:
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
            seq.rows.append(Row(spec, cache, pending, spec.recompute))

    def _forward_and_sample(self) -> None:
        t0 = time.perf_counter()
        for seq in [s for s in self.scheduler.running if not s.rows or any(not r.pending for r in s.rows)]:
            # a broken invariant (every running row has a token to feed): fail this request alone, loudly
            log.error("request %s has rows with nothing to feed (pending %s); failing it",
                      seq.req.request_id, [len(r.pending) for r in seq.rows])
            self._finish(seq, "error", error="internal error: the request had nothing left to compute")
        plans = self.scheduler.plan()
        if not plans:
            return
        ids: list[int] = []
        segments: list[Segment] = []
        for p in plans:
            # a recompute of the row's injected prefix rides in front of its first chunk
            rc, p.row.recompute = p.row.recompute, None
            extra = list(rc.ids) if rc is not None else []
            segments.append(Segment(p.row.cache, len(ids), len(extra) + p.n, p.row.spec.adapters,
                                    p.want_logits, rc))
            ids.extend(extra)
            ids.extend(p.row.pending[:p.n])
            p.row.pending = p.row.pending[p.n:]
        logits = self.runner.forward(self.runner.ids(ids), segments)
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

    def _emit_token(self, seq: Sequence, logits: torch.Tensor) -> None:
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

    def _finish(self, seq: Sequence, reason: str, text: str = "", error: Optional[str] = None,
                token_ids: Optional[list[int]] = None, logprobs: Optional[list] = None) -> None:
        if seq.done:
            return
        seq.done = True
        self.scheduler.remove(seq)
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
