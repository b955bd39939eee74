"""The engine worker on a tiny random Llama: continuous batching gives each row its own
tokens, cancellation, limits, pooled KV slots, paired rows, failures, background work
and the engine thread."""

import threading
import time

import pytest
import torch

from server.engine.kvcache import KVPrefix
from server.engine.model import LlamaRunner
from server.engine.types import GenRequest, RowSpec, WorkerLimits
from server.errors import InvalidRequest, QueueFull
from tests.engine_util import Collector, PROMPTS, greedy, recording_hook, run_alone
from tests.tiny import tiny_engine, tiny_model


def test_chunked_prefill_gives_the_same_tokens():
    full, _ = run_alone(PROMPTS[1], 8)
    chunked, _ = run_alone(PROMPTS[1], 8, limits=WorkerLimits(step_token_budget=5))
    assert chunked == full


def test_batched_rows_of_different_lengths_joining_late_match_running_alone():
    alone = {i: run_alone(p, 10)[0] for i, p in enumerate(PROMPTS)}
    eng = tiny_engine(WorkerLimits(step_token_budget=16))
    got = {i: [] for i in range(len(PROMPTS))}

    def hook_for(i):
        return recording_hook(got[i])

    sinks = [Collector() for _ in PROMPTS]
    # request 0 and 1 start together, 2 joins after three steps, 3 after six
    for i in (0, 1):
        eng.worker.submit(GenRequest(str(i), [RowSpec(PROMPTS[i])], greedy(10), hook_for(i)), sinks[i])
    for step in range(100):
        if step == 3:
            eng.worker.submit(GenRequest("2", [RowSpec(PROMPTS[2])], greedy(10), hook_for(2)), sinks[2])
        if step == 6:
            eng.worker.submit(GenRequest("3", [RowSpec(PROMPTS[3])], greedy(10), hook_for(3)), sinks[3])
        if not eng.worker.step() and step > 6:
            break
    assert got == alone
    assert all(s.finish == "length" for s in sinks)


def test_pool_slots_are_reused_and_oversized_rows_get_private_caches():
    runner = LlamaRunner(tiny_model())
    pool = runner.new_pool(slots=2, row_tokens=16)
    a, b = pool.acquire(16), pool.acquire(10)
    assert (a.slot, b.slot) == (0, 1) and pool.acquire(4) is None  # full
    assert pool.acquire(17) is None  # larger than a slot
    pool.release(a)
    pool.release(a)  # idempotent
    assert pool.free_slots == 1
    with pytest.raises(IndexError):  # a released cache cannot touch the slot's new owner
        a.write(0, 0, torch.zeros(1, 2, 16), torch.zeros(1, 2, 16))
    # through the engine: a request too long for a slot still runs, beside pooled rows
    limits = WorkerLimits(pool_row_tokens=16)
    long_prompt = PROMPTS[1]  # 37 tokens + 4 > 16
    alone_long, _ = run_alone(long_prompt, 4, limits)
    alone_short, _ = run_alone(PROMPTS[0], 4, limits)
    eng = tiny_engine(limits)
    seen = {0: [], 1: []}
    cs = [Collector(), Collector()]
    eng.worker.submit(GenRequest("l", [RowSpec(long_prompt)], greedy(4), recording_hook(seen[0])), cs[0])
    eng.worker.submit(GenRequest("s", [RowSpec(PROMPTS[0])], greedy(4), recording_hook(seen[1])), cs[1])
    while eng.worker.step():
        pass
    assert seen == {0: alone_long, 1: alone_short}
    assert eng.worker.kv_pool.free_slots == 2 * limits.max_batch_size  # every slot back


def test_cancelled_row_leaves_the_others_unchanged():
    alone = run_alone(PROMPTS[0], 10)[0]
    eng = tiny_engine()
    got = []
    keep, drop = Collector(), Collector()
    eng.worker.submit(GenRequest("keep", [RowSpec(PROMPTS[0])], greedy(10), recording_hook(got)), keep)
    handle = eng.worker.submit(GenRequest("drop", [RowSpec(PROMPTS[1])], greedy(50)), drop)
    for _ in range(4):
        eng.worker.step()
    handle.cancel()
    while eng.worker.step():
        pass
    assert got == alone
    assert drop.finish == "cancelled" and len(drop.events) <= 5
    assert eng.worker.stats()["running"] == 0 and eng.worker.stats()["kv_in_flight"] == 0


def test_queue_limit_raises_queue_full_and_oversized_requests_are_refused():
    eng = tiny_engine(WorkerLimits(max_queue=2, max_tokens_in_flight=100))
    for i in range(2):
        eng.worker.submit(GenRequest(str(i), [RowSpec([5, 6])], greedy(4)), Collector())
    with pytest.raises(QueueFull) as exc:
        eng.worker.submit(GenRequest("x", [RowSpec([5, 6])], greedy(4)), Collector())
    assert exc.value.retry_after >= 1
    with pytest.raises(InvalidRequest):
        eng.worker.submit(GenRequest("big", [RowSpec(list(range(90)))], greedy(20)), Collector())


def test_paired_rows_reach_the_logits_hook_together():
    eng = tiny_engine(WorkerLimits(step_token_budget=8))
    seen = []

    def hook(lg):
        seen.append(tuple(lg.shape))
        return lg[0]

    c = Collector()
    # a long "with context" row and a short "without context" row of one request
    eng.worker.submit(GenRequest("p", [RowSpec(PROMPTS[1]), RowSpec(PROMPTS[0])], greedy(5), hook), c)
    while eng.worker.step():
        pass
    assert seen == [(2, 259)] * 5
    assert c.finish == "length" and len(c.tokens) == c.events[-1].completion_tokens == 5


def test_engine_error_fails_the_requests_and_the_engine_keeps_serving():
    eng = tiny_engine()
    bad = Collector()

    def boom(lg):
        raise RuntimeError("hook exploded")

    eng.worker.submit(GenRequest("bad", [RowSpec(PROMPTS[0])], greedy(5), boom), bad)
    while eng.worker.step():
        pass
    assert bad.finish == "error" and "hook exploded" in bad.events[-1].error
    ok = Collector()
    eng.worker.submit(GenRequest("ok", [RowSpec(PROMPTS[0])], greedy(5)), ok)
    while eng.worker.step():
        pass
    assert ok.finish == "length"


def test_a_request_whose_prefix_does_not_fit_fails_alone():
    eng = tiny_engine()
    bad, ok = Collector(), Collector()
    wrong = KVPrefix(torch.zeros(1, 2, 2, 4, 16))  # one layer where the model has two
    eng.worker.submit(GenRequest("bad", [RowSpec([5, 6], prefix=wrong)], greedy(3)), bad)
    eng.worker.submit(GenRequest("ok", [RowSpec([5, 6])], greedy(3)), ok)
    while eng.worker.step():
        pass
    assert bad.finish == "error" and "does not fit" in bad.events[-1].error
    assert ok.finish == "length"


def test_background_calls_yield_to_live_requests():
    """Training steps (background calls) run at once when idle, at most one per interval
    while requests decode; ordinary calls still run at the next step."""
    eng = tiny_engine(WorkerLimits(background_interval_s=30.0))
    eng.start()
    try:
        out = Collector()
        tokens_at = {}

        def mark(name):
            def fn():
                tokens_at[name] = len(out.events)
            return fn

        eng.worker.submit(GenRequest("long", [RowSpec(PROMPTS[0])], greedy(200)), out)
        first = eng.worker.call(mark("bg1"), background=True)
        second = eng.worker.call(mark("bg2"), background=True)
        normal = eng.worker.call(mark("normal"))
        second.result(timeout=60)
        first.result(timeout=60)
        normal.result(timeout=60)
        assert out.finish == "length"
        assert tokens_at["normal"] < 200  # an ordinary call is not held back
        assert tokens_at["bg1"] < 200  # the first background call may run (none ran in the interval)
        assert tokens_at["bg2"] >= 200  # the second waits until nothing is decoding
        idle = eng.worker.call(lambda: "ran", background=True)
        assert idle.result(timeout=10) == "ran"  # idle engine: at once, no interval
    finally:
        eng.shutdown()


def test_background_generation_yields_to_live_requests_and_keeps_its_tokens():
    """A build's generation (background request) advances at most once per interval while a
    live request runs, then at full speed; its tokens are those it gets alone."""
    alone_bg, _ = run_alone(PROMPTS[1], 6)
    eng = tiny_engine(WorkerLimits(background_interval_s=3600.0))
    eng.worker.scheduler.last_background = time.perf_counter()  # the interval has just started
    seen_bg, seen_live = [], []
    bg, live = Collector(), Collector()
    eng.worker.submit(GenRequest("bg", [RowSpec(PROMPTS[1])], greedy(6), recording_hook(seen_bg), background=True), bg)
    eng.worker.submit(GenRequest("live", [RowSpec(PROMPTS[0])], greedy(5), recording_hook(seen_live)), live)
    assert eng.worker.busy
    while live.finish is None:
        assert eng.worker.step()
    assert not bg.events and not seen_bg  # held back for the whole live request
    assert not eng.worker.busy  # only background work left
    while eng.worker.step():
        pass
    assert seen_bg == alone_bg and bg.finish == "length"


def test_a_second_start_does_not_add_a_second_loop():
    # two runtimes around one engine (the tests' session engines; an embedding application)
    # each start it: two loops stepping one engine corrupted vLLM's batch state
    from server.engine.loop import LoopThread

    class Loop(LoopThread):
        def __init__(self):
            self._cv, self._stop, self._thread, self.loops = threading.Condition(), False, None, 0

        def _loop(self):
            with self._cv:
                self.loops += 1
                while not self._stop:
                    self._cv.wait()

    loop = Loop()
    loop.start()
    loop.start()
    time.sleep(0.2)
    assert loop.loops == 1 and loop.alive
    loop.shutdown()
    assert not loop.alive
