"""KV-cache injection on a tiny random model: equivalence, re-rotation, batching, store checks, API."""

import httpx
import torch

from server.engine.blend import rotate_keys
from server.engine.model import LlamaRunner, Segment
from server.engine.types import GenRequest, RowSpec, SamplingParams
from server.kv.service import KVService
from server.kv.store import KVEntry, KVStore
from server.prompt import Passage, PromptBuilder
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
    import time

    srv = make_server()
    docs = [{"id": p.doc_id, "title": p.title, "text": p.text} for p in PASSAGES]
    r = httpx.post(srv.url + "/v1/documents", json={"documents": docs, "build": ["kv"]}).json()
    job = r["job"]
    deadline = time.time() + 60
    while job["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.1)
        job = httpx.get(srv.url + f"/v1/jobs/{job['id']}").json()
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


def test_cacheblend_full_recompute_equals_full_prefill_and_partial_moves_toward_it(tmp_path):
    engine, kv = service(tmp_path)
    layout = kv.prompts.with_passages(ASK, PASSAGES)
    prefix = kv.join([kv.passage(p.doc_id, ids).entry for p, ids in zip(PASSAGES, layout.passages)])
    ids = layout.ids[: prefix.length]
    exact = len(layout.head) + len(layout.passages[0])
    ref = prefill_logits(engine.runner, layout.ids)

    def answer_logits(pfx):
        cache = engine.runner.new_cache(pfx.length + len(layout.tail))
        cache.import_prefix(pfx)
        return engine.runner.forward(torch.tensor(layout.tail), [Segment(cache, 0, len(layout.tail), want_logits=True)])[0]

    full, n_full = kv.blend(prefix, ids, exact, 1.0)
    assert n_full == len(ids) - exact
    torch.testing.assert_close(answer_logits(full), ref, atol=1e-3, rtol=1e-3)
    none, n_none = kv.blend(prefix, ids, exact, 0.0)
    part, n_part = kv.blend(prefix, ids, exact, 0.3)
    assert n_none == 0 and 0 < n_part < n_full
    err = lambda p: float((answer_logits(p) - ref).abs().max())  # noqa: E731
    assert err(part) < err(none)
    assert err(none) > 1e-3  # without recompute the joined cache really differs from a full prefill


def test_kv_recompute_is_validated(make_server):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "a", "text": "Zorbl is a cat."}]})
    for bad in (1.5, -0.1):
        r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "kv"},
                       json={"model": "knowmux", "messages": ASK, "kv_recompute": bad})
        assert r.status_code == 400 and r.json()["error"]["param"] == "kv_recompute"


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
