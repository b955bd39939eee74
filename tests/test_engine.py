"""The engine on a tiny random Llama: equivalence with transformers, batching, cancellation, limits."""

import threading
import time

import pytest
import torch

from server.engine.aio import generate_blocking
from server.engine.kvcache import KVPrefix
from server.engine.lora import AdapterSet
from server.engine.kernels import _ONEDNN_LINEAR, _ONEDNN_REORDER, KERNELS, Proj, tune_kernels
from server.engine.model import LlamaRunner, Segment
from server.engine.torch_engine import TorchEngine
from server.engine.types import GenRequest, RowSpec, SamplingParams
from server.engine.types import WorkerLimits
from server.errors import InvalidRequest, QueueFull
from tests.tiny import tiny_engine, tiny_model, tiny_tokenizer

PROMPTS = [[5, 9, 13, 200, 31], list(range(40, 77)), [100] * 3 + [7, 8, 9, 10, 11, 12], [250, 3, 90]]


def greedy(n, ignore_eos=True, **kw):
    return SamplingParams(max_tokens=n, ignore_eos=ignore_eos, **kw)


class Collector:
    """A sink that records events; .tokens and .text when finished."""

    def __init__(self):
        self.events = []
        self.done = threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason is not None:
            self.done.set()

    @property
    def tokens(self):
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def text(self):
        return "".join(ev.text for ev in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason if self.events and self.events[-1].finish_reason else None


def recording_hook(seen: list):
    """Masks eos (as transformers' min_new_tokens does) and records each greedy choice."""

    def hook(lg):
        out = lg[0].clone()
        out[2] = float("-inf")
        seen.append(int(out.argmax()))
        return out

    return hook


def run_alone(prompt, n, limits=None, **kw):
    eng = tiny_engine(limits)
    seen = []
    hook = recording_hook(seen)
    c = Collector()
    eng.worker.submit(GenRequest("x", [RowSpec(prompt)], greedy(n, **kw), logits_hook=hook), c)
    while eng.worker.step():
        pass
    return seen, c


def test_forward_matches_transformers_logits():
    model = tiny_model()
    ids = torch.tensor([PROMPTS[1]])
    ref = model(ids).logits[0].detach()
    runner = LlamaRunner(model)
    cache = runner.new_cache(64)
    # prefill in two chunks: the second attends to the first through the cache
    a = runner.forward(ids[0, :20], [Segment(cache, 0, 20, want_logits=True)])
    b = runner.forward(ids[0, 20:], [Segment(cache, 0, 17, want_logits=True)])
    torch.testing.assert_close(a[0], ref[19], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(b[0], ref[-1], atol=1e-4, rtol=1e-4)
    top2 = ref[-1].topk(2).values
    assert top2[0] - top2[1] > 1e-3, "the tiny model must be initialised wide enough for stable greedy choices"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_tokens_match_transformers_generate(prompt):
    model = tiny_model()
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, min_new_tokens=12,
                         pad_token_id=0)
    expected = out[0, len(prompt):].tolist()
    got, c = run_alone(prompt, 12)
    assert got == expected
    assert c.finish == "length"


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


def test_batched_logits_equal_single_row_logits_within_tolerance():
    runner = LlamaRunner(tiny_model())
    caches = [runner.new_cache(64) for _ in PROMPTS]
    singles = [runner.forward(torch.tensor(p), [Segment(c, 0, len(p), want_logits=True)])[0]
               for p, c in zip(PROMPTS, caches)]
    caches = [runner.new_cache(64) for _ in PROMPTS]
    segs, start = [], 0
    for p, c in zip(PROMPTS, caches):
        segs.append(Segment(c, start, len(p), want_logits=True))
        start += len(p)
    packed = runner.forward(torch.tensor(sum(PROMPTS, [])), segs)
    for i, s in enumerate(singles):
        torch.testing.assert_close(packed[i], s, atol=1e-4, rtol=1e-4)


def test_pooled_decode_rows_attend_in_one_call_with_the_private_rows_logits():
    """Decode rows in pool slots (with a gap of a free slot between them) beside a prefill
    chunk and a private-cache decode row: every row's logits equal its own private run."""
    runner = LlamaRunner(tiny_model())
    pool = runner.new_pool(slots=4, row_tokens=64)
    pool.kv.fill_(float("nan"))  # never-written memory may hold anything; masked positions must not leak it

    def prefilled(prompt, cache):
        runner.forward(torch.tensor(prompt), [Segment(cache, 0, len(prompt))])
        return cache

    gap = pool.acquire(8)
    pooled = [prefilled(PROMPTS[0], pool.acquire(64))]
    pool.release(gap)  # slot 0 free, slot 1 used
    pooled.append(prefilled(PROMPTS[1], pool.acquire(64)))  # takes slot 0 again
    pooled.append(prefilled(PROMPTS[3], pool.acquire(64)))  # slot 2
    assert [c.slot for c in pooled] == [1, 0, 2]
    private = [prefilled(p, runner.new_cache(64)) for p in (PROMPTS[0], PROMPTS[1], PROMPTS[3])]
    odd = prefilled(PROMPTS[2], runner.new_cache(64))
    odd_ref = prefilled(PROMPTS[2], runner.new_cache(64))
    fresh, fresh_ref = runner.new_cache(64), runner.new_cache(64)

    ids = [17, 18, 19, 20] + PROMPTS[0]
    segs = [Segment(c, i, 1, want_logits=True) for i, c in enumerate(pooled)]
    segs += [Segment(odd, 3, 1, want_logits=True), Segment(fresh, 4, len(PROMPTS[0]), want_logits=True)]
    got = runner.forward(torch.tensor(ids), segs)
    for i, c in enumerate(private + [odd_ref]):
        want = runner.forward(torch.tensor([ids[i]]), [Segment(c, 0, 1, want_logits=True)])[0]
        torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
    want = runner.forward(torch.tensor(PROMPTS[0]), [Segment(fresh_ref, 0, len(PROMPTS[0]), want_logits=True)])[0]
    torch.testing.assert_close(got[4], want, atol=1e-4, rtol=1e-4)
    assert [c.length for c in pooled] == [len(PROMPTS[0]) + 1, len(PROMPTS[1]) + 1, len(PROMPTS[3]) + 1]


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


def test_stop_strings_and_streamed_text_join_to_the_full_text():
    eng = tiny_engine()
    eng.start()
    try:
        text, finish = generate_blocking(eng, GenRequest("a", [RowSpec(PROMPTS[1])], greedy(30)), timeout=60)
        assert finish == "length" and len(text) > 0
        stop = text[5:8]
        c = Collector()
        eng.submit(GenRequest("b", [RowSpec(PROMPTS[1])], greedy(30, stop=(stop,))), c)
        assert c.done.wait(60)
        assert c.finish == "stop"
        assert c.text == text[:text.index(stop)]
    finally:
        eng.shutdown()


def test_seeded_sampling_is_reproducible():
    eng = tiny_engine()
    eng.start()
    try:
        params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
        a = generate_blocking(eng, GenRequest("a", [RowSpec(PROMPTS[0])], params), timeout=60)
        b = generate_blocking(eng, GenRequest("b", [RowSpec(PROMPTS[0])], params), timeout=60)
        assert a == b
    finally:
        eng.shutdown()


def test_eos_finishes_with_stop():
    eng = tiny_engine()
    c = Collector()
    eos = next(iter(eng.eos_ids))
    # force eos on the third token through the logits hook
    calls = []

    def hook(lg):
        calls.append(1)
        out = lg[0].clone()
        if len(calls) == 3:
            out[eos] = 1e9
        return out

    eng.worker.submit(GenRequest("a", [RowSpec(PROMPTS[0])], greedy(20, ignore_eos=False), hook), c)
    while eng.worker.step():
        pass
    assert c.finish == "stop" and c.events[-1].completion_tokens == 3


def test_per_row_lora_deltas_equal_merged_weights():
    torch.manual_seed(1)
    base = tiny_model()
    runner = LlamaRunner(base)
    rank = 2
    deltas = {}
    for layer in range(2):
        for proj, (out_f, in_f) in {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128),
                                    "q_proj": (64, 64)}.items():
            deltas[(layer, proj)] = (torch.randn(rank, in_f) * 0.3, torch.randn(out_f, rank) * 0.3)
    adapters = AdapterSet(deltas, name="t")
    merged = tiny_model()
    with torch.no_grad():
        for (layer, proj), (a, b) in deltas.items():
            mod = merged.model.layers[layer]
            lin = getattr(mod.mlp if proj.endswith(("gate_proj", "up_proj", "down_proj")) else mod.self_attn, proj)
            lin.weight += b @ a
    ids = torch.tensor(PROMPTS[1])
    ref = merged(ids[None]).logits[0, -1].detach()
    # the adapter row and a plain row share one forward
    c1, c2 = runner.new_cache(64), runner.new_cache(64)
    out = runner.forward(torch.cat([ids, ids]), [Segment(c1, 0, len(ids), adapters, True),
                                                 Segment(c2, len(ids), len(ids), None, True)])
    plain = base(ids[None]).logits[0, -1].detach()
    torch.testing.assert_close(out[0], ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], plain, atol=1e-4, rtol=1e-4)


def _forced(proj: Proj, kernel: str) -> Proj:
    proj.use((kernel,) * len(Proj.BUCKETS))
    return proj


@pytest.mark.parametrize("bias", [False, True])
def test_every_gemm_kernel_computes_the_same_product_at_every_row_count(bias):
    # the kernel chosen at start-up must not change what a projection computes
    assert _ONEDNN_LINEAR is not None and _ONEDNN_REORDER is not None, "the pinned torch has oneDNN's linear"
    torch.manual_seed(3)
    w, b = torch.randn(96, 40), (torch.randn(96) if bias else None)
    kept = w.clone()  # a weight the caller holds anyway (a tied lm_head's embedding)
    projs = [_forced(Proj(w, b), k) for k in KERNELS] + [_forced(Proj(kept, b, keep_rows=True), k) for k in KERNELS]
    assert projs[1].packed is not None or not Proj._mkl  # MKL as served: packed for a few rows
    assert projs[2].dnn_packed is not None and projs[0].packed is None and projs[0].dnn_packed is None
    # on oneDNN a kept weight gets no transposed copy; MKL's x @ t needs one
    assert projs[3].t.data_ptr() == projs[5].t.data_ptr() == kept.data_ptr() and not projs[3].t.is_contiguous()
    assert projs[4].t.is_contiguous() and projs[4].t.data_ptr() != kept.data_ptr()
    ref = torch.nn.functional.linear
    for n in (1, 3, 8, 40, 64, 65, 600):
        x = torch.randn(n, 40)
        for p in projs:
            torch.testing.assert_close(p(x), ref(x, w, b), atol=1e-4, rtol=1e-4)
        column_major = x.t().contiguous().t()  # same values, another layout
        for p in projs[0], projs[2], projs[3], projs[5]:
            torch.testing.assert_close(p(column_major), ref(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep_rows", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_onednn_training_product_gives_the_plain_gradient(kernel, keep_rows):
    # LoRA training backpropagates to the input through frozen weights, on oneDNN where it is
    # faster (for a kept weight, through its transposed view: there is no transposed copy)
    torch.manual_seed(4)
    w, b = torch.randn(80, 48), torch.randn(80)
    x = torch.randn(33, 48)
    grads = []
    for k, keep in (("mkl", False), (kernel, keep_rows)):
        xi = x.clone().requires_grad_()
        y = _forced(Proj(w, b, keep_rows=keep), k).train_call(xi)
        (y * torch.linspace(-1, 1, 80)).square().sum().backward()
        grads.append((y.detach(), xi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-4)


def test_kernel_tuning_keeps_packed_copies_only_where_a_chosen_kernel_reads_them(monkeypatch):
    import time as time_mod
    clock = [0.0]
    cost = {"onednn": 10, "mkl": 10, "onednn_packed": 10}  # a fake clock: each product "takes" its cost

    def timed(kernel_fn):
        def call(self, kernel, x):
            clock[0] += cost[kernel]
            return kernel_fn(self, kernel, x)
        return call

    monkeypatch.setattr(Proj, "call_with", timed(Proj.call_with))
    monkeypatch.setattr(time_mod, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("KNOWMUX_ONEDNN", "1")
    every = len(Proj.BUCKETS)

    def tuned(**costs):
        cost.update(costs)
        projs = [Proj(torch.randn(64, 32)) for _ in range(2)]
        assert all(p.packed is None and p.dnn_packed is None for p in projs)  # packed only once chosen
        return tune_kernels(projs), projs

    # a tie (or a win under 10%) keeps plain oneDNN, which needs no copy of the weights
    choice, projs = tuned(mkl=9.5, onednn_packed=9.5)
    assert choice == {(64, 32): ["onednn"] * every}
    assert all(p.kernels == ("onednn",) * every and p.packed is None and p.dnn_packed is None for p in projs)
    choice, projs = tuned(onednn_packed=5)
    assert choice == {(64, 32): ["onednn_packed"] * every}
    assert all(p.dnn_packed is not None and p.packed is None for p in projs)  # every projection of the shape
    choice, projs = tuned(mkl=1)
    assert choice == {(64, 32): ["mkl"] * every}
    assert all((p.packed is not None or not Proj._mkl) and p.dnn_packed is None for p in projs)

    # an lm_head serves one row per sequence: never timed at prefill sizes, it keeps its decode choice
    rows_seen = []
    monkeypatch.setattr(Proj, "call_with", lambda self, kernel, x: rows_seen.append(x.shape[0]))
    head = Proj(torch.randn(64, 32), few_rows=True)
    assert tune_kernels([head]) == {(64, 32): ["onednn"] * every}
    assert max(rows_seen) == Proj.PACKED_MAX_ROWS


def test_kernel_tuning_serves_without_the_blocked_layout_where_onednn_cannot_reorder(monkeypatch, caplog):
    import server.engine.kernels as kernels_mod

    def refuse(w, rows):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(kernels_mod, "_ONEDNN_REORDER", refuse)
    monkeypatch.setenv("KNOWMUX_ONEDNN", "1")
    projs = [Proj(torch.randn(64, 32)) for _ in range(2)]
    choice = tune_kernels(projs)
    assert all(k in ("onednn", "mkl") for k in choice[(64, 32)])
    assert all(p.dnn_packed is None for p in projs) and "no blocked oneDNN layout" in caplog.text
    x = torch.randn(3, 32)
    torch.testing.assert_close(projs[0](x), x @ projs[0].t, atol=1e-4, rtol=1e-4)


def test_combining_adapter_sets_is_the_exact_sum_of_deltas():
    torch.manual_seed(2)
    sets = [AdapterSet({(0, "up_proj"): (torch.randn(2, 64), torch.randn(128, 2))}, name=str(i)) for i in range(3)]
    scales = [1.0, 0.5, 2.0]
    combo = AdapterSet.combine(sets, scales)
    a, b = combo.get(0, "up_proj")
    expected = sum(s * st.get(0, "up_proj")[1] @ st.get(0, "up_proj")[0] for s, st in zip(scales, sets))
    torch.testing.assert_close(b @ a, expected, atol=1e-5, rtol=1e-5)


def test_exported_prefix_imported_into_another_row_gives_full_prefill_logits():
    runner = LlamaRunner(tiny_model())
    prompt = PROMPTS[1]
    full = runner.new_cache(64)
    ref = runner.forward(torch.tensor(prompt), [Segment(full, 0, len(prompt), want_logits=True)])[0]
    prefix = full.export(0, 20)
    assert isinstance(prefix, KVPrefix) and prefix.length == 20
    row = runner.new_cache(64)
    row.import_prefix(prefix)
    out = runner.forward(torch.tensor(prompt[20:]), [Segment(row, 0, len(prompt) - 20, want_logits=True)])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


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


def test_detokenizer_holds_back_partial_stop_strings_and_utf8():
    from server.engine.detok import IncrementalDetokenizer

    tok = tiny_tokenizer()
    ids = tok.encode("héllo END tail", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=("END",))
    out = "".join(d.add(i) for i in ids if not d.stopped)
    assert d.stopped and out == "héllo "
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in tok.encode("né", add_special_tokens=False)]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + d.flush() == "né"


def test_prefix_cache_serves_shared_prompt_blocks_with_the_same_tokens():
    shared = list(range(60, 100))  # 40 tokens: two full 16-token blocks are shareable
    eng = tiny_engine()
    first, second, with_adapter = Collector(), Collector(), Collector()
    eng.worker.submit(GenRequest("a", [RowSpec(shared + [5, 6])], greedy(8)), first)
    while eng.worker.step():
        pass
    assert first.events[-1].cached_tokens == 0
    eng.worker.submit(GenRequest("b", [RowSpec(shared + [5, 6])], greedy(8)), second)
    while eng.worker.step():
        pass
    assert second.events[-1].cached_tokens == 32 and second.tokens == first.tokens
    # rows with low-rank deltas have other KV for the same tokens: they never use the cache
    aset = AdapterSet({(0, "up_proj"): (torch.zeros(1, 64), torch.zeros(128, 1))})
    eng.worker.submit(GenRequest("c", [RowSpec(shared + [5, 6], adapters=aset)], greedy(8)), with_adapter)
    while eng.worker.step():
        pass
    assert with_adapter.events[-1].cached_tokens == 0 and with_adapter.tokens == first.tokens


def test_prefix_cache_block_size_is_a_setting():
    # finer blocks share more of a common prefix (vLLM's --block-size); 0 is refused at start
    from server.config import Settings
    from server.engine.prefix_cache import PrefixCache
    from server.runtime import worker_limits

    limits = worker_limits(Settings.from_env(env={"KNOWMUX_PREFIX_CACHE_BLOCK": "4"}))
    assert limits.prefix_cache_block == 4
    eng = tiny_engine(limits)
    shared = list(range(60, 98))  # 38 tokens: 16 + 16 shareable in blocks of 16, 36 in blocks of 4
    first, second = Collector(), Collector()
    for name, sink in (("a", first), ("b", second)):
        eng.worker.submit(GenRequest(name, [RowSpec(shared + [5, 6])], greedy(8)), sink)
        while eng.worker.step():
            pass
    assert second.events[-1].cached_tokens == 36 and second.tokens == first.tokens
    with pytest.raises(ValueError, match="at least 1 token"):
        PrefixCache(block=0)


def test_prefix_cache_leaves_a_token_to_prefill_and_is_bounded():
    from server.engine.prefix_cache import PrefixCache

    runner = LlamaRunner(tiny_model())
    ids = list(range(10, 42))  # exactly two blocks
    cache = runner.new_cache(40)
    runner.forward(torch.tensor(ids), [Segment(cache, 0, len(ids))])
    pc = PrefixCache(block=16, max_tokens=16)
    pc.insert(ids, cache)
    assert len(pc._blocks) == 1  # bounded to one block: the first was evicted
    pc = PrefixCache(block=16, max_tokens=64)
    pc.insert(ids, cache)
    hit = pc.lookup(ids)
    assert hit.length == 16  # 32 tokens = 2 blocks, but one token must stay to produce logits
    assert pc.lookup(ids + [1]).length == 32 and pc.lookup([9] + ids) is None
    torch.testing.assert_close(hit.kv, cache.kv[:, :, :, :16])


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


def test_logprobs_are_the_models_log_softmax_with_the_top_k_best_first():
    model = tiny_model()
    prompt = PROMPTS[0]
    eng = tiny_engine()
    c = Collector()
    eng.worker.submit(GenRequest("lp", [RowSpec(prompt)], greedy(6, logprobs=3)), c)
    while eng.worker.step():
        pass
    lps = [lp for ev in c.events for lp in ev.logprobs]
    assert [lp.token_id for lp in lps] == c.tokens and len(lps) == 6
    ref = torch.log_softmax(model(torch.tensor([prompt + c.tokens])).logits[0].detach(), dim=-1)
    for i, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        values, ids = row.topk(3)
        assert [t for t, _ in lp.top] == ids.tolist()  # greedy: the chosen token leads
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_follow_the_logits_hook_and_are_off_unless_asked():
    eng = tiny_engine()

    def favour_seven(lg):  # a hook such as CK-PLUG's decides the distribution tokens come from
        out = lg[0].clone()
        out[7] += 50.0
        return out

    asked, plain = Collector(), Collector()
    eng.worker.submit(GenRequest("h", [RowSpec(PROMPTS[0])], greedy(3, logprobs=0), favour_seven), asked)
    eng.worker.submit(GenRequest("p", [RowSpec(PROMPTS[0])], greedy(3)), plain)
    while eng.worker.step():
        pass
    lps = [lp for ev in asked.events for lp in ev.logprobs]
    assert [lp.token_id for lp in lps] == [7, 7, 7]
    assert all(lp.logprob > -1e-3 and lp.top == () for lp in lps)
    assert all(ev.logprobs == [] for ev in plain.events)


def test_logit_bias_and_penalties_change_the_choice_as_openai_defines_them():
    from server.engine.sampling import adjust

    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    p = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 4.0),))
    # token 1 generated twice, token 2 once: 3 - 0.5 - 2 * 0.25, 2 - 0.5 - 0.25; token 3 biased
    torch.testing.assert_close(adjust(logits, p, [1, 2, 1]), torch.tensor([1.0, 2.0, 1.25, 4.0]))
    assert adjust(logits, SamplingParams(max_tokens=1), [1, 2]) is logits
    assert logits.tolist() == [1.0, 3.0, 2.0, 0.0]

    # through the worker: the tiny model repeats itself on this prompt; a presence penalty
    # of 2 stops it (no token twice), and a large bias forces one token throughout
    out = {name: Collector() for name in ("plain", "presence", "bias")}
    eng = tiny_engine()
    for name, kw in (("plain", {}), ("presence", {"presence_penalty": 2.0}), ("bias", {"logit_bias": ((5, 30.0),)})):
        eng.worker.submit(GenRequest(name, [RowSpec(PROMPTS[2])], greedy(12, **kw)), out[name])
    while eng.worker.step():
        pass
    assert len(set(out["plain"].tokens)) < 12 and len(set(out["presence"].tokens)) == 12
    assert out["presence"].tokens[:2] == out["plain"].tokens[:2]  # nothing to penalise before a repeat
    assert out["bias"].tokens == [5] * 12
    with pytest.raises(InvalidRequest, match="logit_bias"):
        eng.worker.submit(GenRequest("v", [RowSpec(PROMPTS[2])], greedy(2, logit_bias=((10**6, 1.0),))), Collector())


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


@pytest.mark.parametrize("model_type,config", [("qwen2", {}), ("qwen2", {"tie_word_embeddings": True}),
                                               ("mistral", {"sliding_window": None})])
def test_other_llama_family_models_match_transformers(model_type, config):
    # the README's claim: Qwen2 (q/k/v biases) and Mistral run on the same forward
    from tests.tiny import tiny_model_of

    model = tiny_model_of(model_type, **config)
    prompt = PROMPTS[1]
    ref = model(torch.tensor([prompt])).logits[0].detach()
    runner = LlamaRunner(model)
    cache = runner.new_cache(64)
    out = runner.forward(torch.tensor(prompt), [Segment(cache, 0, len(prompt), want_logits=True)])[0]
    torch.testing.assert_close(out, ref[-1], atol=1e-4, rtol=1e-4)
    expected = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8,
                              pad_token_id=0)[0, len(prompt):].tolist()
    eng = TorchEngine(model, tiny_tokenizer(), model_id=model_type)
    seen = []
    eng.worker.submit(GenRequest("g", [RowSpec(prompt)], greedy(8), logits_hook=recording_hook(seen)), Collector())
    while eng.worker.step():
        pass
    assert seen == expected


def test_a_sliding_window_caps_the_context_where_full_attention_is_the_same():
    from tests.tiny import tiny_model_of

    model = tiny_model_of("mistral", sliding_window=16)
    runner = LlamaRunner(model)
    assert runner.max_positions == 16
    prompt = PROMPTS[1][:16]
    ref = model(torch.tensor([prompt])).logits[0, -1].detach()
    cache = runner.new_cache(16)
    out = runner.forward(torch.tensor(prompt), [Segment(cache, 0, 16, want_logits=True)])[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert LlamaRunner(tiny_model_of("qwen2", sliding_window=16, use_sliding_window=False)).max_positions == 2048


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
