"""KV-cache injection on a tiny random model: equivalence, re-rotation, batching, store checks, API."""

import httpx
import torch

from server.engine.rope import rotate_keys
from server.engine.model import LlamaRunner, Segment
from server.engine.types import GenRequest, RowSpec, SamplingParams
from server.kv.service import KVService
from server.kv.store import KVEntry, KVStore
from server.prompt import Passage, PromptBuilder
from tests.conftest import wait_for_job
from tests.tiny import tiny_engine, tiny_model, tiny_tokenizer

PASSAGES = [Passage("a", "Zorbl", "Zorbl is a purple cat who lives on the moon."),
            Passage("b", "Paris", "Paris is the capital of France."),
            Passage("c", "QCD", "Quantum chromodynamics describes quarks.")]
ASK = [{"role": "user", "content": "Where does Zorbl live?"}]


def prefill_logits(runner, ids):
    cache = runner.new_cache(len(ids) + 4)
    return runner.forward(torch.tensor(ids), [Segment(cache, 0, len(ids), want_logits=True)])[0]


def service(tmp_path, engine=None):
    engine = engine or tiny_engine()
    return engine, KVService(engine, PromptBuilder(engine.tokenizer), KVStore(tmp_path / "kv"))


def test_one_stored_passage_injected_gives_the_full_prefill_logits(tmp_path):
    engine, kv = service(tmp_path)
    layout = kv.prompts.with_passages(ASK, PASSAGES[:1])
    entry = kv.passage("a", layout.passages[0]).entry
    prefix = kv.join([entry])
    assert prefix.length == len(layout.head) + len(layout.passages[0])
    cache = engine.runner.new_cache(prefix.length + len(layout.tail))
    cache.import_prefix(prefix)
    got = engine.runner.forward(torch.tensor(layout.tail), [Segment(cache, 0, len(layout.tail), want_logits=True)])[0]
    ref = prefill_logits(LlamaRunner(tiny_model()), layout.ids)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rerotated_keys_match_a_cache_computed_at_the_shifted_positions():
    runner = LlamaRunner(tiny_model())
    ids = list(range(20, 60))
    at0 = runner.new_cache(64)
    runner.forward(torch.tensor(ids), [Segment(at0, 0, len(ids))])
    shifted = runner.new_cache(64, pos_offset=37)  # the same tokens, 37 positions later
    runner.forward(torch.tensor(ids), [Segment(shifted, 0, len(ids))])
    moved = rotate_keys(runner, at0.export(0, len(ids)).kv, 37)
    torch.testing.assert_close(moved, shifted.export(0, len(ids)).kv, atol=1e-4, rtol=1e-4)


def test_joined_passages_sit_at_their_rag_layout_positions(tmp_path):
    """Passage 2 was computed after the head at positions h..; in the joined cache it must
    look as if head and passage had been computed n0 positions later (RoPE is relative,
    so only the rotation of its keys moves), i.e. at its offset h + n0 in the rag layout."""
    engine, kv = service(tmp_path)
    layout = kv.prompts.with_passages(ASK, PASSAGES[:2])
    entries = [kv.passage(p.doc_id, ids).entry for p, ids in zip(PASSAGES, layout.passages)]
    joined = kv.join(entries)
    h, n0, n1 = len(layout.head), len(layout.passages[0]), len(layout.passages[1])
    assert joined.length == h + n0 + n1
    shifted = engine.runner.new_cache(h + n1, pos_offset=n0)
    ids = layout.head + layout.passages[1]
    engine.runner.forward(torch.tensor(ids), [Segment(shifted, 0, len(ids))])
    torch.testing.assert_close(joined.kv[:, :, :, h + n0:], shifted.kv[:, :, :, h:], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(joined.kv[:, :, :, :h], kv.head()[1].kv)


def test_batch_mixing_kv_and_rag_gives_each_its_tokens_alone(tmp_path):
    def run(requests):
        engine, kv = service(tmp_path)
        out = {}
        for name, rows in requests(kv):
            out[name] = []
            engine.worker.submit(GenRequest(name, rows, SamplingParams(max_tokens=8, ignore_eos=True)),
                                 lambda ev, name=name: out[name].extend(ev.token_ids))
        while engine.worker.step():
            pass
        return out

    def kv_rows(kv):
        layout = kv.prompts.with_passages(ASK, PASSAGES[:1])
        prefix = kv.join([kv.passage("a", layout.passages[0]).entry])
        return [RowSpec(layout.tail, prefix=prefix)]

    def rag_rows(kv):
        return [RowSpec(kv.prompts.with_passages(ASK, PASSAGES[1:]).ids)]

    alone_kv = run(lambda kv: [("kv", kv_rows(kv))])["kv"]
    alone_rag = run(lambda kv: [("rag", rag_rows(kv))])["rag"]
    both = run(lambda kv: [("kv", kv_rows(kv)), ("rag", rag_rows(kv))])
    assert both == {"kv": alone_kv, "rag": alone_rag} and len(alone_kv) == 8
    # and kv answers exactly as rag does on the same single passage
    assert run(lambda kv: [("r", [RowSpec(kv.prompts.with_passages(ASK, PASSAGES[:1]).ids)])])["r"] == alone_kv


def test_store_rejects_truncated_altered_and_foreign_caches(tmp_path):
    engine, kv = service(tmp_path)
    ids = kv.prompts.passage_ids(PASSAGES[0])
    first = kv.passage("a", ids)
    assert first.source == "built"
    kv.store.forget_memory()
    assert kv.passage("a", ids).source == "disk"
    path = kv.store.path(first.entry.key)
    data = path.read_bytes()
    for broken in (data[: len(data) // 2], data[:-8] + b"\x00" * 8):
        path.write_bytes(broken)
        kv.store.forget_memory()
        assert kv.store.get(first.entry.key)[1] == "corrupt"
        assert kv.passage("a", ids).source == "built"  # rebuilt, never used
    # another model (different weights) never finds this cache: the key covers the model
    other = KVService(tiny_engine(seed=1), PromptBuilder(tiny_tokenizer()), KVStore(tmp_path / "kv"))
    assert other.key(ids) != first.entry.key and other.passage("a", ids, build=False) is None


def test_store_lru_is_bounded_in_bytes(tmp_path):
    store = KVStore(tmp_path, memory_bytes=3000)
    for i in range(5):
        store.put(KVEntry(f"k{i}", torch.zeros(1, 2, 1, 10, 16), 0), {})
    assert store._lru_bytes <= 3000 and "k4" in store._lru


def test_kv_through_the_api_with_build_job_and_inspection(make_server):

    srv = make_server()
    docs = [{"id": p.doc_id, "title": p.title, "text": p.text} for p in PASSAGES]
    r = httpx.post(srv.url + "/v1/documents", json={"documents": docs, "build": ["kv"]}).json()
    job = wait_for_job(srv.url, r["job"], timeout=60, poll=0.1)
    assert job["status"] == "done" and job["built"] == 3 and job["total"] == 3
    info = httpx.get(srv.url + "/v1/kv/a").json()
    assert info["stored"] and info["shape"][3] == info["tokens"] and info["bytes"] == info["tokens"] * info["bytes_per_token"]
    c = srv.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=6, temperature=0, extra_body={"top_k": 1, "ignore_eos": True})
    kvr = c.chat.completions.create(extra_headers={"X-Strategy": "kv"}, **kw)
    rag = c.chat.completions.create(extra_headers={"X-Strategy": "rag"}, **kw)
    assert kvr.choices[0].message.content == rag.choices[0].message.content
    kx = kvr.model_extra["knowmux"]
    assert kx["strategy"] == "kv" and kx["kv"]["built_now"] == []
    # injected tokens count as prompt tokens; only the question tail was prefilled
    assert kvr.usage.prompt_tokens == rag.usage.prompt_tokens == kx["kv"]["injected_tokens"] + kx["kv"]["prefilled_tokens"]
    assert kx["kv"]["prefilled_tokens"] < kx["kv"]["injected_tokens"]
    # a new document without a cache: on_missing=error refuses, the default builds it now
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "n", "text": "Glimmerleaf tea is blue."}]})
    ask_new = dict(kw, messages=[{"role": "user", "content": "What colour is Glimmerleaf tea?"}])
    e = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"},
                   json={"model": "knowmux", "messages": ask_new["messages"], "top_k": 1, "on_missing": "error"})
    assert e.status_code == 409 and e.json()["error"]["param"] == "on_missing"
    built = c.chat.completions.create(extra_headers={"X-Strategy": "kv"}, **ask_new).model_extra["knowmux"]
    assert built["kv"]["built_now"] == ["n"]
    assert httpx.get(srv.url + "/v1/jobs/nope").status_code == 404


def answer_with(runner, prefix, tail, recompute=None):
    """The first answer token's logits of ``tail`` after ``prefix``, with ``recompute`` of
    the prefix's tokens in the same step (as the worker packs it: its tokens first)."""
    cache = runner.new_cache(prefix.length + len(tail))
    cache.import_prefix(prefix)
    extra = list(recompute.ids) if recompute is not None else []
    seg = Segment(cache, 0, len(extra) + len(tail), want_logits=True, recompute=recompute)
    logits = runner.forward(torch.tensor(extra + list(tail)), [seg])[0]
    assert cache.length == prefix.length + len(tail)  # recomputed tokens overwrite, they do not append
    return logits


def joined(tmp_path, layers: int = 2):
    engine, kv = service(tmp_path, tiny_engine(layers=layers))
    layout = kv.prompts.with_passages(ASK, PASSAGES)
    prefix = kv.join([kv.passage(p.doc_id, ids).entry for p, ids in zip(PASSAGES, layout.passages)])
    return engine, kv, layout, prefix, layout.ids[: prefix.length], len(layout.head) + len(layout.passages[0])


def test_cacheblend_full_recompute_equals_full_prefill_and_partial_moves_toward_it(tmp_path):
    engine, kv, layout, prefix, ids, exact = joined(tmp_path)
    ref = prefill_logits(engine.runner, layout.ids)
    answer = lambda rc: answer_with(engine.runner, prefix, layout.tail, rc)  # noqa: E731
    full = kv.recompute(ids, exact, 1.0, [])
    assert full.tokens == len(ids) - exact
    torch.testing.assert_close(answer(full), ref, atol=1e-3, rtol=1e-3)
    assert kv.recompute(ids, exact, 0.0, []) is None
    part = kv.recompute(ids, exact, 0.3, [])
    assert 0 < part.tokens < full.tokens
    err = lambda rc: float((answer(rc) - ref).abs().max())  # noqa: E731
    assert err(part) < err(None)
    assert err(None) > 1e-3  # without recompute the joined cache really differs from a full prefill


def test_cacheblend_refreshed_per_layer_narrows_and_full_equals_full_prefill(tmp_path):
    """kv_recompute_refresh: the tokens chosen again at every layer on a schedule from 1.5x
    to 0.5x the target; a fraction of 1 keeps every token at every layer (a full prefill)."""
    engine, kv, layout, prefix, ids, exact = joined(tmp_path, layers=5)
    ref = prefill_logits(engine.runner, layout.ids)
    L = engine.runner.n_layers
    full = kv.recompute(ids, exact, 1.0, [], refresh=True)
    assert set(full.keep) == set(range(1, L)) and set(full.keep.values()) == {len(ids) - exact}
    torch.testing.assert_close(answer_with(engine.runner, prefix, layout.tail, full), ref, atol=1e-3, rtol=1e-3)
    part = kv.recompute(ids, exact, 0.3, [], refresh=True)
    counts = [part.keep[li] for li in range(1, L)]
    m = round(0.3 * (len(ids) - exact))
    assert counts == sorted(counts, reverse=True) and counts[0] > m > counts[-1] and abs(part.tokens - m) <= 1
    err = lambda rc: float((answer_with(engine.runner, prefix, layout.tail, rc) - ref).abs().max())  # noqa: E731
    assert err(part) < err(None)


def test_legolink_covering_every_passage_token_equals_full_prefill(tmp_path):
    """LegoLink (kv_link_tokens): recomputing the first N tokens of each passage after the
    first; with N past every passage's length that is every non-exact token, and the
    answer's logits are a full prefill's. N = 2 moves toward it; N = 0 changes nothing."""
    engine, kv, layout, prefix, ids, exact = joined(tmp_path)
    ref = prefill_logits(engine.runner, layout.ids)

    def starts(n):
        pos, out = exact, []
        for pids in layout.passages[1:]:
            out += range(pos, pos + min(n, len(pids)))
            pos += len(pids)
        return out

    every = kv.recompute(ids, exact, 0.0, starts(10_000))
    assert every.tokens == sum(len(p) for p in layout.passages[1:]) and not every.keep
    torch.testing.assert_close(answer_with(engine.runner, prefix, layout.tail, every), ref, atol=1e-3, rtol=1e-3)
    two = kv.recompute(ids, exact, 0.0, starts(2))
    assert two.tokens == 4 and kv.recompute(ids, exact, 0.0, starts(0)) is None
    err = lambda rc: float((answer_with(engine.runner, prefix, layout.tail, rc) - ref).abs().max())  # noqa: E731
    assert err(two) < err(None)
    # LegoLink's tokens and CacheBlend's fraction together: the link tokens always stay
    both = kv.recompute(ids, exact, 0.2, starts(2))
    assert sum(both.pinned) == 4 and both.keep[1] == 4 + round(0.2 * (len(ids) - exact))
    assert err(both) < err(None)


def test_a_recompute_runs_in_the_step_beside_other_rows_without_changing_them(tmp_path):
    """The recompute rides in one packed step with a pooled decode row and another
    prefill behind it: the narrowing at layer 1 moves the rows behind it, and every row
    gets the logits it gets alone."""
    engine, kv, layout, prefix, ids, exact = joined(tmp_path, layers=4)
    runner = engine.runner
    rc = kv.recompute(ids, exact, 0.3, [], refresh=True)
    alone = answer_with(runner, prefix, layout.tail, rc)
    pool = runner.new_pool(4, 256)
    other = list(range(30, 52))

    def decoding_row():
        cache = pool.acquire(64)
        runner.forward(torch.tensor(other), [Segment(cache, 0, len(other))])
        return cache

    solo_cache = decoding_row()
    solo = runner.forward(torch.tensor([7]), [Segment(solo_cache, 0, 1, want_logits=True)])[0]
    late_alone = prefill_logits(runner, other[:9])
    dec_cache = decoding_row()
    blend_cache = runner.new_cache(prefix.length + len(layout.tail))
    blend_cache.import_prefix(prefix)
    late_cache = runner.new_cache(16)
    # the decode row last, so that the narrowing moves it too (the pooled call re-reads its place)
    packed = list(rc.ids) + list(layout.tail) + other[:9] + [7]
    n_blend = len(rc.ids) + len(layout.tail)
    segs = [Segment(blend_cache, 0, n_blend, want_logits=True, recompute=rc),
            Segment(late_cache, n_blend, 9, want_logits=True),
            Segment(dec_cache, n_blend + 9, 1, want_logits=True)]
    got = runner.forward(torch.tensor(packed), segs)
    torch.testing.assert_close(got[0], alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[1], late_alone, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got[2], solo, atol=1e-4, rtol=1e-4)
    assert (dec_cache.length, blend_cache.length, late_cache.length) == (len(other) + 1, prefix.length + len(layout.tail), 9)


def test_kv_recompute_and_link_tokens_are_validated(make_server):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "a", "text": "Zorbl is a cat."}]})
    for field, bad in (("kv_recompute", 1.5), ("kv_recompute", -0.1), ("kv_link_tokens", -1),
                       ("kv_link_tokens", 5000), ("kv_link_tokens", 2.5)):
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"},
                       json={"model": "knowmux", "messages": ASK, field: bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, (field, bad, r.text)
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"},
                   json={"model": "knowmux", "messages": ASK, "kv_link_tokens": 4, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["knowmux"]["kv"]["link_tokens"] == 4
    # APE's options: ranges at the wire, parallel positions refuse a recompute
    for body, param in (({"kv_temperature": 0}, "kv_temperature"), ({"kv_scale": 3}, "kv_scale"),
                        ({"kv_positions": "diagonal"}, "kv_positions"),
                        ({"kv_positions": "parallel", "kv_link_tokens": 4}, "kv_positions"),
                        ({"kv_positions": "parallel", "kv_recompute": 0.5}, "kv_positions")):
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"},
                       json={"model": "knowmux", "messages": ASK, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"}, json={
        "model": "knowmux", "messages": ASK, "kv_positions": "parallel", "kv_temperature": 0.5, "kv_scale": 0.9,
        "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert {k: r.json()["knowmux"]["kv"][k] for k in ("positions", "temperature", "scale")} == \
        {"positions": "parallel", "temperature": 0.5, "scale": 0.9}


def test_a_build_job_prefills_as_background_work_and_a_request_does_not(tmp_path):
    """A build job's passage prefills yield to live requests (the worker's background
    queue: one per build-yield interval while requests run); a kv request that must build
    a missing passage does it at once, as part of its own answer."""
    from indexes.store import Document

    engine, kv = service(tmp_path)
    engine.start()
    try:
        seen = []
        call = engine.worker.call
        engine.worker.call = lambda fn, background=False: (seen.append(background), call(fn, background))[1]
        kv.head()
        seen.clear()
        assert kv.build_document(Document("a", PASSAGES[0].text, PASSAGES[0].title))
        assert seen == [True]
        seen.clear()
        layout = kv.prompts.with_passages(ASK, PASSAGES[1:2])
        assert kv.passage("b", layout.passages[0]).source == "built" and seen == [False]
    finally:
        engine.shutdown()


def test_ape_attention_is_the_papers_three_part_merge():
    """server.engine.ape.attend against a direct transcription of APE's query attention:
    head, passages (temperature T, scale S) and the row's own tokens each softmaxed apart,
    merged by a softmax over their log-sum-exps; T = S = 1 is plain causal attention."""
    import math

    import torch.nn.functional as F

    from server.engine.ape import ParallelContext, attend

    g = torch.Generator().manual_seed(0)
    H, Hkv, D, head, docs, past, n = 4, 2, 8, 3, 7, 12, 3
    q = torch.randn(H, n, D, generator=g) * 2
    k, v = torch.randn(Hkv, past + n, D, generator=g) * 2, torch.randn(Hkv, past + n, D, generator=g)

    def reference(T, S):
        kk, vv = k.repeat_interleave(2, 0), v.repeat_interleave(2, 0)
        out = torch.empty(H, n, D)
        for i in range(n):
            a = torch.einsum("hd,hkd->hk", q[:, i], kk[:, : past + i + 1]) / math.sqrt(D)  # [H, keys seen]
            parts = [(a[:, :head], 1.0, 1.0, slice(0, head)), (a[:, head:head + docs], T, S, slice(head, head + docs)),
                     (a[:, head + docs:], 1.0, 1.0, slice(head + docs, past + i + 1))]
            lse = torch.stack([t * torch.logsumexp(x / t, -1) + math.log(s) for x, t, s, _ in parts], -1)
            w = torch.softmax(lse, -1)
            out[:, i] = sum(w[:, j, None] * (torch.softmax(x / t, -1)[:, None, :] @ vv[:, sl])[:, 0]
                            for j, (x, t, _, sl) in enumerate(parts))
        return out

    for T, S in ((1.0, 1.0), (0.6, 0.8), (1.3, 0.5)):
        ctx = ParallelContext(head, head + docs, T, S)
        torch.testing.assert_close(attend(q, k, v, ctx, past), reference(T, S), atol=1e-5, rtol=1e-5)
    mask = torch.ones(n, past + n, dtype=torch.bool).tril(diagonal=past)
    plain = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask, enable_gqa=True)[0]
    torch.testing.assert_close(attend(q, k, v, ParallelContext(head, head + docs), past), plain,
                               atol=1e-5, rtol=1e-5)


def test_ape_options_on_the_engine(tmp_path):
    """APE through the runner. Parallel positions (a rotation at join time) give what the
    paper's layout gives: every passage where it was encoded, right after the head, the
    question after the longest (built here by hand, unrotated, with the question's positions
    moved instead); with one passage both layouts are a full prefill. T = S = 1 leaves
    `kv`'s logits as they are, other values change them; a row attended APE's way and a rag
    row batched together decode as each does alone."""
    from server.engine.kvcache import KVPrefix

    engine, kv = service(tmp_path)
    layout = kv.prompts.with_passages(ASK, PASSAGES)
    entries = [kv.passage(p.doc_id, ids).entry for p, ids in zip(PASSAGES, layout.passages)]
    h, lengths = len(layout.head), [len(p) for p in layout.passages]

    def logits(prefix, pos_offset=0, tail=layout.tail):
        cache = engine.runner.new_cache(prefix.length + len(tail), pos_offset=pos_offset)
        cache.import_prefix(prefix)
        return engine.runner.forward(torch.tensor(tail), [Segment(cache, 0, len(tail), want_logits=True)])[0]

    par = kv.join(entries, parallel=True)
    assert par.layout == "parallel" and par.length == h + sum(lengths)
    by_hand = KVPrefix(torch.cat([kv.head()[1].kv] + [e.kv for e in entries], dim=3))  # as encoded
    torch.testing.assert_close(logits(par), logits(by_hand, pos_offset=max(lengths) - sum(lengths)),
                               atol=1e-4, rtol=1e-4)
    seq = kv.join(entries)
    assert float((logits(par) - logits(seq)).abs().max()) > 1e-3  # the layouts differ with several passages
    one = kv.prompts.with_passages(ASK, PASSAGES[:1])
    for single in (kv.join(entries[:1], parallel=True), kv.join(entries[:1])):
        torch.testing.assert_close(logits(single, tail=one.tail), prefill_logits(engine.runner, one.ids),
                                   atol=1e-4, rtol=1e-4)

    torch.testing.assert_close(logits(kv.ape(par, h, 1.0, 1.0)), logits(par), atol=1e-4, rtol=1e-4)
    assert float((logits(kv.ape(par, h, 0.5, 0.7)) - logits(par)).abs().max()) > 1e-3

    def run(rows):
        out = {}
        for name, spec in rows:
            out[name] = []
            engine.worker.submit(GenRequest(name, [spec], SamplingParams(max_tokens=6, ignore_eos=True)),
                                 lambda ev, name=name: out[name].extend(ev.token_ids))
        while engine.worker.step():
            pass
        return out

    ape_row = ("ape", RowSpec(layout.tail, prefix=kv.ape(par, h, 0.8, 0.9)))
    rag_row = ("rag", RowSpec(kv.prompts.with_passages(ASK, PASSAGES[1:]).ids))
    alone = {**run([ape_row]), **run([rag_row])}
    assert run([ape_row, rag_row]) == alone and len(alone["ape"]) == 6


def test_kv_server_defaults_are_checked_and_apply_to_requests_that_set_nothing(make_server):
    import pytest

    from server.config import Settings

    for bad in (dict(kv_temperature=0), dict(kv_scale=2.5), dict(kv_positions="diagonal"), dict(kv_link_tokens=-1),
                dict(kv_positions="parallel", kv_link_tokens=4), dict(kv_positions="parallel", kv_recompute=0.3)):
        with pytest.raises(ValueError, match="KNOWMUX_KV_"):
            Settings(**bad)
    assert Settings.from_env(env={"KNOWMUX_KV_POSITIONS": "parallel", "KNOWMUX_KV_SCALE": "0.8"}).kv_scale == 0.8
    ask = {"model": "knowmux", "messages": ASK, "max_tokens": 2}

    def kv_info(srv, **body):
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"}, json={**ask, **body})
        assert r.status_code == 200, r.text
        return r.json()["knowmux"]["kv"]

    srv = make_server(kv_positions="sequential", kv_temperature=0.7)
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "a", "text": "Zorbl is a cat."}]})
    got = kv_info(srv)
    assert (got["positions"], got["temperature"], got["scale"]) == ("sequential", 0.7, 1.0)
    got = kv_info(srv, kv_positions="parallel", kv_temperature=1)
    assert (got["positions"], got["temperature"]) == ("parallel", 1)
    # the default layout is parallel, with APE's temperature from two passages on; a recompute
    # asked for without positions runs in sequence (T = 1), and positions asked for win over
    # the server's recompute
    srv = make_server(kv_recompute=0.5)
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "a", "text": "Zorbl is a cat."},
                                                              {"id": "b", "text": "Zorbl lives on the moon."}]})
    got = kv_info(srv)
    assert (got["positions"], got["recompute_fraction"], got["temperature"]) == ("sequential", 0.5, 1.0)
    got = kv_info(srv, kv_positions="parallel")
    assert (got["positions"], got["recompute_fraction"], got["temperature"]) == ("parallel", 0.0, 0.8)
    assert kv_info(srv, kv_positions="parallel", top_k=1)["temperature"] == 1.0  # one passage is exact
    got = kv_info(srv, kv_recompute=0)
    assert (got["positions"], got["recompute_fraction"]) == ("parallel", 0)
    got = kv_info(srv, kv_link_tokens=2, kv_recompute=0)
    assert (got["positions"], got["link_tokens"]) == ("sequential", 2)
