"""The HTTP API through the official openai client, against uvicorn on loopback, tiny model."""

import concurrent.futures as cf

import httpx
import openai
import pytest

from server.engine.kernels import ROW_BUCKETS
from server.engine.types import WorkerLimits

DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."},
        {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."},
        {"id": "qcd", "title": "QCD", "text": "Quantum chromodynamics describes the strong interaction."}]
ASK = [{"role": "user", "content": "Where does Zorbl the cat live?"}]


@pytest.fixture
def server(make_server):
    srv = make_server(max_tokens_limit=64)
    r = httpx.post(srv.url + "/v1/documents", json={"documents": DOCS})
    assert r.status_code == 200, r.text
    return srv


def error_of(resp: httpx.Response) -> dict:
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]


def test_rag_non_streamed_with_headers_usage_and_knowmux_field(server):
    raw = server.client().chat.completions.with_raw_response.create(
        model="knowmux", messages=ASK, max_tokens=8, temperature=0, extra_headers={"X-Strategy": "rag"},
        extra_body={"top_k": 2})
    resp = raw.parse()
    assert raw.headers["x-strategy"] == "rag"
    assert raw.headers["x-retrieved-docs"].split(",")[0] == "zorbl"
    assert len(raw.headers["x-retrieved-docs"].split(",")) == 2
    assert "prefill;dur=" in raw.headers["server-timing"]
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens <= 8 and resp.usage.prompt_tokens > 50
    kx = resp.model_extra["knowmux"]
    assert kx["strategy"] == "rag" and kx["retrieved"][0]["id"] == "zorbl"
    assert {"retrieve", "prefill", "decode", "ttft", "total"} <= set(kx["timings_ms"])


def test_direct_has_no_retrieval_and_a_shorter_prompt(server):
    c = server.client()
    raw = c.chat.completions.with_raw_response.create(model="knowmux", messages=ASK, max_tokens=4, temperature=0,
                                                      extra_body={"strategy": "direct"})
    d = raw.parse()
    r = c.chat.completions.create(model="knowmux", messages=ASK, max_tokens=4, temperature=0)
    assert raw.headers["x-strategy"] == "direct" and raw.headers["x-retrieved-docs"] == ""
    assert d.usage.prompt_tokens < r.usage.prompt_tokens
    assert r.model_extra["knowmux"]["strategy"] == "rag"  # the default once documents exist


def test_header_wins_over_body_strategy(server):
    raw = server.client().chat.completions.with_raw_response.create(
        model="knowmux", messages=ASK, max_tokens=2, extra_headers={"X-Strategy": "direct"},
        extra_body={"strategy": "rag"})
    assert raw.headers["x-strategy"] == "direct"


@pytest.mark.parametrize("strategy", ["direct", "rag"])
def test_streamed_chunks_join_to_the_non_streamed_text(server, strategy):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=24, temperature=0, extra_body={"strategy": strategy})
    full = c.chat.completions.create(**kw).choices[0].message.content
    chunks = list(c.chat.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full
    last = chunks[-1]
    assert last.choices[0].finish_reason in ("length", "stop")
    assert last.model_extra["knowmux"]["strategy"] == strategy and last.usage.completion_tokens > 0


@pytest.mark.parametrize("strategy", ["direct", "rag", "rag+ckplug"])  # CK-PLUG's: of its reweighted distribution
def test_logprobs_one_per_token_the_same_streamed_or_not(server, strategy):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
              extra_body={"strategy": strategy, "ignore_eos": True})
    full = c.chat.completions.create(**kw)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens == 6
    for t in content:
        assert len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob
        assert t.token == t.top_logprobs[0].token and t.logprob == t.top_logprobs[0].logprob <= 0  # greedy
        assert bytes(t.bytes).decode("utf-8") == t.token
    streamed = [t for ch in c.chat.completions.create(stream=True, **kw)
                if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.token for t in streamed] == [t.token for t in content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-4)
    no = c.chat.completions.create(**{**kw, "logprobs": None, "top_logprobs": None})
    assert no.choices[0].logprobs is None


def test_logit_bias_and_penalties_reach_the_engine(server):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=4, temperature=0, extra_body={"ignore_eos": True})
    forced = c.chat.completions.create(logit_bias={"5": 100}, **kw).choices[0].message.content
    assert forced == server.runtime.engine.tokenizer.decode([5] * 4)
    plain = c.chat.completions.create(**{**kw, "max_tokens": 24}).choices[0].message.content
    fresh = c.chat.completions.create(presence_penalty=2, **{**kw, "max_tokens": 24}).choices[0].message.content
    assert fresh != plain


COMPARED = ["direct", "rag", "rag+ckplug"]


def test_strategies_answer_one_choice_each_as_each_would_alone(server):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=12, temperature=0)
    alone = [c.chat.completions.create(**kw, extra_body={"strategy": s}) for s in COMPARED]
    raw = c.chat.completions.with_raw_response.create(**kw, extra_body={"strategies": COMPARED})
    both = raw.parse()
    assert raw.headers["x-strategy"] == ",".join(COMPARED)
    assert [ch.index for ch in both.choices] == [0, 1, 2]
    for ch, a, name in zip(both.choices, alone, COMPARED):
        assert ch.model_extra["knowmux"]["strategy"] == name
        assert ch.message.content == a.choices[0].message.content  # batched together, as alone
        assert ch.model_extra["knowmux"]["usage"]["prompt_tokens"] == a.usage.prompt_tokens
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    assert both.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert "knowmux" not in both.model_extra  # each choice carries its own

    texts, finished = ["", "", ""], {}
    for chunk in c.chat.completions.create(stream=True, **kw, extra_body={"strategies": COMPARED}):
        for ch in chunk.choices:
            texts[ch.index] += ch.delta.content or ""
            if ch.finish_reason:
                finished[ch.index] = ch.model_extra["knowmux"]["strategy"]
    assert texts == [ch.message.content for ch in both.choices]
    assert finished == dict(enumerate(COMPARED))
    chunks = list(c.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw,
                                            extra_body={"strategies": COMPARED}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == both.usage.completion_tokens
    metrics = httpx.get(server.url + "/metrics").text
    for name in COMPARED:
        assert f'knowmux_requests_total{{arm="",experiment="",status="200",strategy="{name}"}}' in metrics


def test_n_choices_share_a_route_and_are_seeded_apart(server):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=8, temperature=1.0, seed=7, n=3,
              extra_body={"strategy": "rag", "ignore_eos": True})
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    texts = [ch.message.content for ch in a.choices]
    assert texts == [ch.message.content for ch in b.choices]  # reproducible with a seed
    assert len(set(texts)) == 3  # seed + index: three different samples
    one = c.chat.completions.create(**{**kw, "n": 1})
    assert one.choices[0].message.content == texts[0]
    assert a.usage.prompt_tokens == one.usage.prompt_tokens  # one prompt, counted once
    assert a.usage.completion_tokens == 24
    assert {ch.model_extra["knowmux"]["strategy"] for ch in a.choices} == {"rag"}
    streamed = ["", "", ""]
    for chunk in c.chat.completions.create(stream=True, **kw):
        for ch in chunk.choices:
            streamed[ch.index] += ch.delta.content or ""
    assert streamed == texts


def test_choices_are_submitted_all_or_none():
    from server.api.serving_chat import start_choices
    from server.errors import QueueFull

    class Stream:
        cancelled = False

        def cancel(self):
            self.cancelled = True

    started = []

    class Pipeline:
        def start(self, p):
            if len(started) == 2:
                raise QueueFull("full", retry_after=1)
            started.append(Stream())
            return started[-1]

    class Runtime:
        pipeline = Pipeline()

    with pytest.raises(QueueFull):
        start_choices(Runtime(), [object()] * 3)
    assert len(started) == 2 and all(s.cancelled for s in started)


def test_stream_with_include_usage_ends_with_a_usage_chunk(server):
    chunks = list(server.client().chat.completions.create(
        model="knowmux", messages=ASK, max_tokens=5, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0
    assert "knowmux" in chunks[-1].model_extra


def test_models_health_and_metrics(server):
    c = server.client()
    assert [m.id for m in c.models.list().data] == ["knowmux"]
    r = c.chat.completions.with_raw_response.create(model="knowmux", messages=ASK, max_tokens=3)
    assert r.headers["x-strategy"] == "rag"  # auto (the default) found a good hit
    assert r.headers["x-route-reason"].startswith("good hit")
    h = httpx.get(server.url + "/health").json()
    assert h["status"] == "ok" and h["documents"] == 3
    m = httpx.get(server.url + "/metrics").text
    for name in ("knowmux_requests_total", "knowmux_request_latency_seconds", "knowmux_tokens_total",
                 "knowmux_queue_length", "knowmux_running_batch_size", "knowmux_step_tokens"):
        assert name in m
    assert 'knowmux_requests_total{arm="",experiment="",status="200",strategy="rag"} 1.0' in m
    assert 'knowmux_routes_total{rule="preference",strategy="rag"} 1.0' in m
    # the kernel the engine timed fastest: one per weight shape and row bucket
    chosen = [line for line in m.splitlines() if line.startswith("knowmux_gemm_kernel{")]
    shapes = server.runtime.engine.runner.kernels
    assert len(chosen) == len(shapes) * len(ROW_BUCKETS) and all(line.endswith(" 1.0") for line in chosen)


def test_documents_upsert_get_and_delete(server):
    r = httpx.post(server.url + "/v1/documents", json={"documents": [DOCS[0], {"id": "new", "text": "Fresh."}]})
    assert [d["status"] for d in r.json()["data"]] == ["unchanged", "created"]
    assert httpx.get(server.url + "/v1/documents/new").json()["text"] == "Fresh."
    assert httpx.delete(server.url + "/v1/documents/new").json()["deleted"] is True
    e = httpx.delete(server.url + "/v1/documents/new")
    assert e.status_code == 404 and error_of(e)["type"] == "not_found_error"


def test_documents_list_in_pages_with_their_artefacts(server):
    """GET /v1/documents pages through the store in id order (after/limit/has_more), shows
    which artefacts each document has, and refuses a limit out of range."""
    server.runtime.artefacts.kv.build_document(server.runtime.kb.store.get("qcd"))
    first = httpx.get(server.url + "/v1/documents", params={"limit": 2}).json()
    assert [d["id"] for d in first["data"]] == ["paris", "qcd"] and first["has_more"] is True
    assert first["data"][1]["artefacts"] == {"kv": True, "adapter": False}
    assert first["data"][0]["artefacts"] == {"kv": False, "adapter": False} and "text" not in first["data"][0]
    rest = httpx.get(server.url + "/v1/documents", params={"limit": 2, "after": first["last_id"]}).json()
    assert [d["id"] for d in rest["data"]] == ["zorbl"] and rest["has_more"] is False
    r = httpx.get(server.url + "/v1/documents", params={"limit": 0})
    assert r.status_code == 400 and error_of(r)["param"] == "limit"


@pytest.mark.parametrize("body,status,param", [
    ({"model": "knowmux", "messages": []}, 400, "messages"),
    ({"model": "knowmux"}, 400, "messages"),
    ({"model": "knowmux", "messages": "hi"}, 400, "messages"),
    ({"model": "knowmux", "messages": [{"role": "user", "content": 5}]}, 400, None),
    ({"model": "knowmux", "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
    ({"model": "knowmux", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "messages"),
    ({"model": "knowmux", "messages": ASK, "max_tokens": "many"}, 400, "max_tokens"),
    ({"model": "knowmux", "messages": ASK, "max_tokens": 100000}, 400, "max_tokens"),
    ({"model": "knowmux", "messages": ASK, "temperature": -1}, 400, "temperature"),
    ({"model": "knowmux", "messages": ASK, "top_k": 0}, 400, "top_k"),
    ({"model": "knowmux", "messages": ASK, "n": 9}, 400, "n"),
    ({"model": "knowmux", "messages": ASK, "n": 0}, 400, "n"),
    ({"model": "knowmux", "messages": ASK, "strategies": []}, 400, "strategies"),
    ({"model": "knowmux", "messages": ASK, "strategies": ["rag"] * 9}, 400, "strategies"),
    ({"model": "knowmux", "messages": ASK, "strategies": ["rag", "direct"], "n": 2}, 400, "strategies"),
    ({"model": "knowmux", "messages": ASK, "strategies": ["rag", "direct"], "strategy": "rag"}, 400, "strategies"),
    ({"model": "knowmux", "messages": ASK, "strategies": ["rag", "telepathy"]}, 400, "strategy"),
    ({"model": "knowmux", "messages": ASK, "strategies": "rag"}, 400, "strategies"),
    ({"model": "knowmux", "messages": ASK, "top_logprobs": 2}, 400, "top_logprobs"),
    ({"model": "knowmux", "messages": ASK, "logprobs": True, "top_logprobs": 21}, 400, "top_logprobs"),
    ({"model": "knowmux", "messages": ASK, "logprobs": True, "top_logprobs": "two"}, 400, "top_logprobs"),
    ({"model": "knowmux", "messages": ASK, "presence_penalty": 3}, 400, "presence_penalty"),
    ({"model": "knowmux", "messages": ASK, "frequency_penalty": "lots"}, 400, "frequency_penalty"),
    ({"model": "knowmux", "messages": ASK, "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ({"model": "knowmux", "messages": ASK, "logit_bias": {"\u00b2": 1}}, 400, "logit_bias"),
    ({"model": "knowmux", "messages": ASK, "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"model": "knowmux", "messages": ASK, "logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"model": "knowmux", "messages": ASK, "logit_bias": [5]}, 400, "logit_bias"),
    ({"model": "knowmux", "messages": ASK, "strategy": "telepathy"}, 400, "strategy"),
    ({"model": "gpt-9", "messages": ASK}, 404, "model"),
])
def test_bad_requests_get_openai_shaped_errors(server, body, status, param):
    r = httpx.post(server.url + "/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = error_of(r)
    if param is not None:
        assert err["param"] == param, err
    if body.get("strategy") == "telepathy":
        assert "direct" in err["message"] and "rag" in err["message"]


def test_malformed_json_and_bodies_too_large(server):
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in error_of(r)["message"]
    r = httpx.post(server.url + "/v1/documents", json={"documents": [{"id": "x", "text": ""}]})
    assert r.status_code == 400 and error_of(r)["param"] == "documents[0]"
    r = httpx.post(server.url + "/v1/documents", json={"documents": [{"id": "x", "text": "y" * 100_001}]})
    assert r.status_code == 413
    r = httpx.post(server.url + "/v1/documents", content=b"x" * (17 * 1024 * 1024),
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and error_of(r)["code"] == "payload_too_large"
    assert httpx.get(server.url + "/health").status_code == 200


def test_context_length_exceeded(make_server):
    from tests.tiny import tiny_engine

    srv = make_server(engine=tiny_engine(), max_context=128)
    with pytest.raises(openai.BadRequestError) as e:
        srv.client().chat.completions.create(model="knowmux", messages=[{"role": "user", "content": "word " * 200}],
                                             max_tokens=4)
    assert e.value.code == "context_length_exceeded"


def test_rag_without_documents_is_409_and_the_default_is_direct(make_server):
    srv = make_server()
    c = srv.client()
    with pytest.raises(openai.ConflictError) as e:
        c.chat.completions.create(model="knowmux", messages=ASK, max_tokens=2, extra_body={"strategy": "rag"})
    assert "no documents" in e.value.message
    raw = c.chat.completions.with_raw_response.create(model="knowmux", messages=ASK, max_tokens=2)
    assert raw.headers["x-strategy"] == "direct"


def test_queue_full_is_429_with_retry_after(make_server):
    srv = make_server(limits=WorkerLimits(max_batch_size=1, max_queue=1))
    c = srv.client()
    long = dict(model="knowmux", messages=ASK, max_tokens=60, extra_body={"strategy": "direct"})
    with cf.ThreadPoolExecutor(6) as pool:
        futs = [pool.submit(lambda: c.chat.completions.with_raw_response.create(**long)) for _ in range(6)]
        outcomes = []
        for f in futs:
            try:
                outcomes.append(f.result().status_code)
            except openai.RateLimitError as e:
                assert int(e.response.headers["retry-after"]) >= 1
                assert e.code == "queue_full"
                outcomes.append(429)
    assert 429 in outcomes and 200 in outcomes


def test_32_concurrent_clients_each_answered_exactly_once(make_server):
    srv = make_server(limits=WorkerLimits(max_batch_size=8, max_queue=64))
    c = srv.client()

    def ask(i):
        r = c.chat.completions.create(model="knowmux", messages=[{"role": "user", "content": f"question {i}"}],
                                      max_tokens=6, temperature=0, extra_body={"strategy": "direct"})
        return r.id, r.choices[0].message.content

    with cf.ThreadPoolExecutor(32) as pool:
        results = list(pool.map(ask, range(32)))
    assert len({rid for rid, _ in results}) == 32
    # same question -> same greedy answer whatever the batch it ran in
    alone = ask(5)[1]
    assert results[5][1] == alone
    stats = httpx.get(srv.url + "/health").json()
    assert stats["running"] == 0 and stats["queue"] == 0 and stats["kv_in_flight"] == 0


def test_concurrent_multi_choice_requests_each_answered_once(make_server):
    srv = make_server(limits=WorkerLimits(max_batch_size=8, max_queue=64))
    c = srv.client()

    def ask(i, **extra):
        r = c.chat.completions.create(model="knowmux", messages=[{"role": "user", "content": f"question {i}"}],
                                      max_tokens=6, temperature=0, **extra)
        return r.id, [ch.message.content for ch in r.choices]

    multi = [{"n": 2, "extra_body": {"strategy": "direct"}}, {"extra_body": {"strategies": ["direct", "direct"]}}]
    with cf.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda i: ask(i, **multi[i % 2]), range(16)))
    assert len({rid for rid, _ in results}) == 16
    for i in (4, 5):  # greedy: both choices are the answer the question gets alone
        assert results[i][1] == ask(i, extra_body={"strategy": "direct"})[1] * 2
    stats = httpx.get(srv.url + "/health").json()
    assert stats["running"] == 0 and stats["queue"] == 0 and stats["kv_in_flight"] == 0


@pytest.mark.parametrize("choices", [{"strategy": "direct"}, {"strategies": ["direct", "direct"]}])
def test_client_disconnect_mid_stream_frees_the_slot(make_server, choices):
    import time

    srv = make_server()
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json={
            "model": "knowmux", "messages": ASK, "max_tokens": 1000, "ignore_eos": True, "stream": True,
            **choices}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    deadline = time.time() + 10
    while time.time() < deadline and httpx.get(srv.url + "/health").json()["running"]:
        time.sleep(0.05)
    health = httpx.get(srv.url + "/health").json()
    # freed by the cancellation, not by running out its 1000 tokens (the tiny model is fast)
    assert health["running"] == 0 and health["steps"] < 500


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the crash is the point
def test_a_dead_engine_thread_turns_into_503_with_retry_after(make_server):
    import time

    srv = make_server()
    worker = srv.runtime.engine.worker

    def broken_step():
        raise RuntimeError("simulated engine crash")

    worker.step = broken_step
    worker._wake()  # no work queued: send one request so the loop calls step
    c = srv.client()
    with pytest.raises((openai.InternalServerError, openai.APIStatusError)) as first:
        c.chat.completions.create(model="knowmux", messages=ASK, max_tokens=4)
    assert first.value.status_code in (500, 503)
    deadline = time.time() + 10
    while worker.alive and time.time() < deadline:
        time.sleep(0.05)
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "knowmux", "messages": ASK, "max_tokens": 4})
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "simulated engine crash" in error_of(r)["message"]
    h = httpx.get(srv.url + "/health")
    assert h.status_code == 503 and h.json()["status"] == "unhealthy"


def test_usage_reports_prompt_tokens_served_by_the_prefix_cache(server):
    c = server.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=3, extra_body={"strategy": "direct"})
    c.chat.completions.create(**kw)
    again = c.chat.completions.create(**kw)
    assert again.usage.prompt_tokens_details.cached_tokens >= 16


def test_a_cancelled_job_stops_before_its_next_group_and_is_not_resumed(tmp_path):
    """Cancelling a running job lets the group in flight finish (what it built stays
    built) and starts no other; a queued job never starts; a restart resumes neither;
    the listing shows the newest first."""
    import threading
    import time as _time

    from server.jobs import Builder, JobManager

    calls, entered, release = [], threading.Event(), threading.Event()

    def build(ids):
        calls.append(list(ids))
        entered.set()
        release.wait(10)
        return [True] * len(ids)

    jobs = JobManager(tmp_path)
    running = jobs.submit("adapters", ["a", "b", "c", "d"], Builder(build, group=2))
    queued = jobs.submit("kv", ["e"], Builder(build))
    assert entered.wait(10)
    assert jobs.cancel(queued.id).status == "cancelled"
    assert jobs.cancel(running.id).status == "cancelled"
    release.set()
    sentinel = jobs.submit("kv", ["z"], Builder(build))  # jobs run one at a time, in order
    deadline = _time.time() + 10
    while jobs.get(sentinel.id).status != "done" and _time.time() < deadline:
        _time.sleep(0.02)
    jobs.shutdown()
    assert calls == [["a", "b"], ["z"]]  # the group in flight finished; the cancelled ones ran nothing more
    view = jobs.get(running.id)
    assert (view.status, view.done, view.built) == ("cancelled", 2, 2)
    assert jobs.cancel("job-000000000000") is None
    assert [j.id for j in jobs.recent()] == [sentinel.id, queued.id, running.id]

    again = JobManager(tmp_path)  # a restart: cancelled jobs stay cancelled
    assert again.resume(lambda kind: Builder(build)) == []
    assert [j.status for j in again.recent()] == ["done", "cancelled", "cancelled"]
    again.shutdown()


def test_jobs_api_lists_and_cancels(server):
    """GET /v1/jobs lists the newest first; POST /v1/jobs/{id}/cancel on a finished job
    is a 409 and on an unknown one a 404, both OpenAI-shaped."""
    import time as _time

    from server.jobs import Builder

    job = server.runtime.jobs.submit("kv", ["x"], Builder(lambda ids: [False] * len(ids)))
    deadline = _time.time() + 10
    while server.runtime.jobs.get(job.id).status != "done" and _time.time() < deadline:
        _time.sleep(0.02)
    listed = httpx.get(server.url + "/v1/jobs", params={"limit": 5}).json()
    assert listed["object"] == "list" and listed["data"][0]["id"] == job.id
    r = httpx.post(server.url + f"/v1/jobs/{job.id}/cancel")
    assert r.status_code == 409 and r.json()["error"]["code"] == "conflict"
    r = httpx.post(server.url + "/v1/jobs/job-000000000000/cancel")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    assert httpx.get(server.url + "/v1/jobs", params={"limit": 0}).status_code == 400


def test_jobs_build_in_groups_and_count_each_document(tmp_path):
    """A builder with group 3 gets the documents three at a time; per-document results
    (built, stored already, failed) are counted and the record on disk says so."""
    import json
    import time as _time

    from server.jobs import Builder, JobManager

    calls = []

    def build(ids):
        calls.append(list(ids))
        return [ValueError("bad doc") if i == "d4" else i != "d2" for i in ids]

    jobs = JobManager(tmp_path)
    job = jobs.submit("adapters", [f"d{i}" for i in range(7)], Builder(build, group=3))
    deadline = _time.time() + 10
    while jobs.get(job.id).status in ("queued", "running") and _time.time() < deadline:
        _time.sleep(0.02)
    done = jobs.get(job.id)
    assert calls == [["d0", "d1", "d2"], ["d3", "d4", "d5"], ["d6"]]
    assert (done.status, done.done, done.built, done.skipped) == ("done", 7, 5, 1)
    assert done.errors == [{"doc_id": "d4", "error": "ValueError: bad doc"}]
    assert json.loads((tmp_path / f"{job.id}.json").read_text())["done"] == 7
    jobs.shutdown()


def test_ask_cli_prints_each_strategy_side_by_side(server, make_server, capsys):
    from server.cli import main

    args = ["ask", "Where does Zorbl the cat live?", "--url", server.url, "--max-tokens", "4"]
    assert main(args + ["--strategies", "direct,rag"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[direct] ttft") and "retrieved: -" in out[0] and "mean logprob -" in out[0]
    assert out[2].startswith("[rag] ttft") and "retrieved: zorbl (0." in out[2]
    assert main(args + ["--strategies", "rag"]) == 0  # one choice: the response's own knowmux object
    assert capsys.readouterr().out.startswith("[rag] ttft")
    assert main(args + ["--strategies", "telepathy"]) == 1
    assert "400" in capsys.readouterr().err
    assert main(["ask", "q", "--url", "http://127.0.0.1:9"]) == 2
    assert "cannot reach" in capsys.readouterr().err
    named = make_server(served_model_name="smol")  # asks for the model the server serves
    assert main(["ask", "hi", "--url", named.url, "--strategies", "direct", "--max-tokens", "2"]) == 0


def test_tokenize_and_detokenize_as_vllm_serves_them(server):
    tok = server.runtime.engine.tokenizer
    r = httpx.post(server.url + "/tokenize", json={"model": "knowmux", "prompt": "Zorbl is a cat"})
    assert r.status_code == 200 and r.json()["tokens"] == tok.encode("Zorbl is a cat")
    assert r.json()["count"] == len(r.json()["tokens"]) and r.json()["max_model_len"] > 0
    back = httpx.post(server.url + "/detokenize", json={"tokens": r.json()["tokens"]})
    assert back.status_code == 200 and back.json()["prompt"] == "Zorbl is a cat"
    # messages: the prompt `direct` prefills, so its count is a direct request's prompt tokens
    counted = httpx.post(server.url + "/tokenize", json={"messages": ASK}).json()["count"]
    direct = server.client().chat.completions.create(model="knowmux", messages=ASK, max_tokens=1,
                                                    extra_body={"strategy": "direct"})
    assert counted == direct.usage.prompt_tokens
    for path, body, param in [("/tokenize", {"prompt": "a", "messages": ASK}, "prompt"), ("/tokenize", {}, "prompt"),
                              ("/tokenize", {"prompt": "a", "model": "gpt-9"}, "model"),
                              ("/detokenize", {"tokens": [10 ** 9]}, "tokens"), ("/detokenize", {"tokens": [-1]}, "tokens"),
                              ("/detokenize", {"tokens": "abc"}, "tokens")]:
        r = httpx.post(server.url + path, json=body)
        assert r.status_code in (400, 404) and error_of(r)["param"] == param, (path, body, r.text)


def test_a_chat_template_that_refuses_the_messages_is_a_400(make_server):
    srv = make_server()
    srv.runtime.engine.tokenizer.chat_template = (
        "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    twice = [{"role": "user", "content": "hi"}, {"role": "user", "content": "hi again"}]
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "knowmux", "messages": twice, "max_tokens": 2})
    assert r.status_code == 400 and error_of(r)["param"] == "messages" and "roles must alternate" in r.text
    r = httpx.post(srv.url + "/tokenize", json={"messages": twice})
    assert r.status_code == 400 and error_of(r)["param"] == "messages"
    assert httpx.get(srv.url + "/health").status_code == 200


def test_a_model_without_a_chat_template_gets_the_plain_one_or_the_given_file(make_server, tmp_path, caplog):
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    base = tiny_engine()
    base.tokenizer.chat_template = None  # a base model's folder
    srv = make_server(engine=base)
    assert "no chat template" in caplog.text
    hi = [{"role": "user", "content": "hi"}]
    ids = httpx.post(srv.url + "/tokenize", json={"messages": hi}).json()["tokens"]
    assert base.tokenizer.decode(ids) == "User: hi\nAssistant:"
    r = httpx.post(srv.url + "/v1/chat/completions", json={"model": "knowmux", "messages": hi, "max_tokens": 2})
    assert r.status_code == 200, r.text

    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }} {% endfor %}"
                        "{% if add_generation_prompt %}[answer]{% endif %}")
    srv = make_server(chat_template=template)
    ids = httpx.post(srv.url + "/tokenize", json={"messages": hi}).json()["tokens"]
    assert srv.runtime.engine.tokenizer.decode(ids) == "[user] hi [answer]"
    with pytest.raises(ValueError, match="KNOWMUX_CHAT_TEMPLATE"):
        Runtime.build(Settings.from_env(env={}, data_dir=tmp_path / "d", chat_template=tmp_path / "missing"),
                      engine=tiny_engine())
