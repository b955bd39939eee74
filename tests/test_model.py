"""The runner's forward on tiny random models: equivalence with transformers, batching
and padding within tolerance, pooled decode attention, per-row LoRA deltas, injected
prefixes, other Llama-family models."""

import pytest
import torch

from server.engine.kvcache import KVPrefix
from server.engine.lora import AdapterSet
from server.engine.model import LlamaRunner, Segment
from server.engine.torch_engine import TorchEngine
from server.engine.types import GenRequest, RowSpec
from tests.engine_util import Collector, PROMPTS, greedy, recording_hook, run_alone
from tests.tiny import tiny_model, tiny_tokenizer


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


def test_ape_rows_decode_in_the_pooled_call_with_their_own_attention():
    """Rows reweighting their passages APE's way (different T and S) decode in the one
    pooled call beside a plain row; each row's logits equal its private run, which takes
    the per-row path (server.engine.ape.attend) and is checked against APE's equations."""
    from server.engine.ape import ParallelContext
    from server.engine.attention import PooledDecode

    runner = LlamaRunner(tiny_model())
    pool = runner.new_pool(slots=3, row_tokens=64)
    pool.kv.fill_(float("nan"))
    contexts = [ParallelContext(2, 12, 0.8, 1.0), None, ParallelContext(1, 6, 1.3, 0.9)]
    prompts = [PROMPTS[1], PROMPTS[0], PROMPTS[2]]

    def prefilled(prompt, cache, ctx):
        runner.forward(torch.tensor(prompt), [Segment(cache, 0, len(prompt))])
        cache.parallel = ctx
        return cache

    pooled = [prefilled(p, pool.acquire(64), c) for p, c in zip(prompts, contexts)]
    private = [prefilled(p, runner.new_cache(64), c) for p, c in zip(prompts, contexts)]
    segs = [Segment(c, i, 1, want_logits=True) for i, c in enumerate(pooled)]
    call = PooledDecode.of(segs, runner.n_heads, runner.head_dim, runner.dtype)
    assert all(s in call for s in segs) and call.ape is not None  # one call, APE rows included
    ids = [21, 22, 23]
    for step in range(2):  # two decode steps: the second reads the first's keys back from the pool
        got = runner.forward(torch.tensor(ids), [Segment(c, i, 1, want_logits=True) for i, c in enumerate(pooled)])
        for i, c in enumerate(private):
            want = runner.forward(torch.tensor([ids[i]]), [Segment(c, 0, 1, want_logits=True)])[0]
            torch.testing.assert_close(got[i], want, atol=1e-4, rtol=1e-4)
        plain = runner.forward(torch.tensor([ids[0]]), [Segment(prefilled(prompts[0], runner.new_cache(64), None),
                                                                0, 1, want_logits=True)])[0] if step == 0 else None
        if plain is not None:  # the reweighting changes row 0's answer: the path is not a no-op
            assert (got[0] - plain).abs().max() > 1e-3
        ids = [int(x) for x in got.argmax(-1)]


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
