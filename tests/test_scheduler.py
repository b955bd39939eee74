"""The batching policy: every step moves every running batch, the KV-token budget holds
requests back, and a request waits for a twin prefilling its prompt."""

from server.engine.types import GenRequest, RowSpec, WorkerLimits
from tests.engine_util import Collector, greedy
from tests.tiny import tiny_engine


def test_plan_step_always_moves_every_running_batch():
    """Random running batches (pairs included, any budget): the plan is never empty and
    never feeds more than a row holds; a regression test for a held-back pair that once
    left a step with nothing to run."""
    import random

    from server.engine.scheduler import plan_step

    class Row:
        def __init__(self, n):
            self.pending = list(range(n))

    class Seq:
        def __init__(self, rows):
            self.rows = rows

    rng = random.Random(0)
    for _ in range(20000):
        running = [Seq([Row(rng.choice([1, 1, 2, 3, 17, 511, 600])) for _ in range(rng.choice([1, 1, 2]))])
                   for _ in range(rng.randint(1, 4))]
        plans = plan_step(running, rng.choice([1, 2, 3, 8, 512]))
        assert plans
        assert all(0 < p.n <= len(p.row.pending) for p in plans)


def test_max_tokens_in_flight_holds_requests_back_until_others_finish():
    eng = tiny_engine(WorkerLimits(max_tokens_in_flight=30))
    a, b = Collector(), Collector()
    eng.worker.submit(GenRequest("a", [RowSpec([5] * 10)], greedy(10)), a)
    eng.worker.submit(GenRequest("b", [RowSpec([6] * 10)], greedy(10)), b)
    eng.worker.step()
    assert eng.worker.stats()["running"] == 1 and eng.worker.stats()["queue"] == 1
    while eng.worker.step():
        pass
    assert a.finish == b.finish == "length"


def test_a_request_waits_for_its_twins_prefill_and_then_reuses_it():
    # n > 1 choices and rag beside rag+ckplug bring the same long prompt in one step:
    # the second waits one prefill, then prefills only what the prefix cache lacks
    prompt = list(range(60, 160))  # 100 tokens: 6 full 16-token blocks to reuse
    eng = tiny_engine()
    solo = Collector()
    eng.worker.submit(GenRequest("s", [RowSpec(prompt)], greedy(6)), solo)
    while eng.worker.step():
        pass
    eng = tiny_engine()  # an empty prefix cache again
    a, b, c = Collector(), Collector(), Collector()
    eng.worker.submit(GenRequest("a", [RowSpec(prompt)], greedy(6)), a)
    eng.worker.submit(GenRequest("b", [RowSpec(prompt)], greedy(6)), b)
    head_only = list(range(60, 100)) + list(range(170, 230))  # shares a 40-token head only: no reason to wait
    eng.worker.submit(GenRequest("c", [RowSpec(head_only)], greedy(6)), c)
    eng.worker.step()
    assert eng.worker.stats()["running"] == 2 and eng.worker.stats()["queue"] == 1  # a and c; b waits
    while eng.worker.step():
        pass
    assert a.events[-1].cached_tokens == 0 and b.events[-1].cached_tokens == 96
    assert a.tokens == b.tokens == solo.tokens
    short = Collector(), Collector()  # direct-sized prompts: cheaper to prefill side by side than to wait
    for i, c in enumerate(short):
        eng.worker.submit(GenRequest(f"s{i}", [RowSpec(list(range(10, 50)))], greedy(2)), c)
    eng.worker.step()
    assert eng.worker.stats()["queue"] == 0


def test_a_request_waiting_for_a_cancelled_twin_goes_on():
    prompt = list(range(60, 160))
    eng = tiny_engine(WorkerLimits(step_token_budget=16))  # the twin's prefill takes several steps
    a, b = Collector(), Collector()
    handle = eng.worker.submit(GenRequest("a", [RowSpec(prompt)], greedy(6)), a)
    eng.worker.submit(GenRequest("b", [RowSpec(prompt)], greedy(6)), b)
    eng.worker.step()
    assert eng.worker.stats()["queue"] == 1
    handle.cancel()
    while eng.worker.step():
        pass
    assert a.finish == "cancelled" and b.finish == "length" and b.events[-1].cached_tokens == 0
