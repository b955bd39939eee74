"""A request's options travel from the wire to the strategy unchanged: ``None`` alone means
"not given". A 0, 0.0, False or "" is a value (``0 == False`` in Python: a truthiness
filter once turned ``ckplug_alpha: 0`` into ``adaptive`` and ``kv_recompute: 0`` into the
server's default)."""

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from server.api.chat import to_input
from server.api.protocol import STRATEGY_OPTIONS, ChatCompletionRequest

DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."}]
ASK = [{"role": "user", "content": "Where does Zorbl live?"}]

# every strategy option with the values a client may send (valid or not: validation is the
# strategy's, so that its 400 names the field; what must hold here is that nothing is lost)
OPTION_VALUES = {
    "ckplug_alpha": st.one_of(st.sampled_from([0, 0.0, 1, 1.0, "adaptive", "", False]),
                              st.floats(0, 1), st.integers(-2, 2)),
    "ckplug_condition": st.sampled_from(["paper", "code", ""]),
    "ckplug_trace": st.booleans(),
    "on_missing": st.sampled_from(["build", "skip", "error"]),
    "kv_recompute": st.one_of(st.sampled_from([0, 0.0, 1.0]), st.floats(-1, 2, allow_nan=False)),
    "adapters": st.sampled_from([[], [{"doc_id": "a", "scale": 0}], [{"doc_id": "a", "scale": 0.0}]]),
}
# the ChatInput fields that a request field fills, with the values a client may send
INPUT_VALUES = {
    "top_k": ("top_k", st.integers(0, 30)),
    "max_tokens": ("max_tokens", st.integers(0, 100)),
    "temperature": ("temperature", st.sampled_from([0, 0.0, 0.7, 2])),
    "top_p": ("top_p", st.sampled_from([1, 0.5, 1e-9])),
    "seed": ("seed", st.integers(-5, 5)),
    "presence_penalty": ("presence_penalty", st.sampled_from([0, 0.0, -2, 1.5])),
    "frequency_penalty": ("frequency_penalty", st.sampled_from([0, 0.0, -2, 1.5])),
    "ignore_eos": ("ignore_eos", st.booleans()),
    "user": ("user", st.sampled_from(["ann", "0"])),
}


def _request(headers=()) -> Request:
    return Request({"type": "http", "headers": [(k.lower().encode(), v.encode()) for k, v in headers]})


def test_every_strategy_option_is_covered():
    assert set(OPTION_VALUES) == set(STRATEGY_OPTIONS)


@settings(max_examples=200, deadline=None)
@given(sent=st.fixed_dictionaries({}, optional={**OPTION_VALUES, **{k: v for k, (_, v) in INPUT_VALUES.items()}}))
def test_a_value_sent_arrives_unchanged(sent):
    body = ChatCompletionRequest(model="knowmux", messages=ASK, **sent)
    inp = to_input(body, _request(), "knowmux")
    for k in STRATEGY_OPTIONS:
        if k in sent:
            assert k in inp.options and inp.options[k] == sent[k] and type(inp.options[k]) is type(getattr(body, k))
        else:
            assert k not in inp.options  # not given: the strategy's default, or the server's
    for k, (field, _) in INPUT_VALUES.items():
        if k in sent:
            assert getattr(inp, field) == sent[k], k
    assert inp.options == body.strategy_options()


def test_zero_values_survive_as_numbers():
    body = ChatCompletionRequest(model="knowmux", messages=ASK, ckplug_alpha=0, kv_recompute=0, ckplug_trace=False)
    assert body.strategy_options() == {"ckplug_alpha": 0, "kv_recompute": 0.0, "ckplug_trace": False}


@pytest.mark.parametrize("strategy", ["rag+ckplug", "kv+ckplug"])
def test_ckplug_alpha_reaches_the_hook_as_sent(make_server, strategy):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    for alpha, shown in ((0, 0.0), (0.0, 0.0), (0.5, 0.5), (1, 1.0), ("adaptive", "adaptive"), (None, "adaptive")):
        body = {"model": "knowmux", "messages": ASK, "max_tokens": 2, "strategy": strategy, "top_k": 1}
        if alpha is not None:
            body["ckplug_alpha"] = alpha
        r = httpx.post(srv.url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["knowmux"]["ckplug"]["alpha"] == shown, (alpha, r.json()["knowmux"]["ckplug"])
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
        "model": "knowmux", "messages": ASK, "strategy": strategy, "ckplug_condition": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "ckplug_condition"  # "" is not "paper"


def test_kv_recompute_zero_is_honoured_over_the_server_default(make_server):
    srv = make_server(kv_recompute=0.5)
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS + [
        {"id": "b", "text": "Tycho is a lunar crater with a bright ray system."}]}).raise_for_status()

    def kv_info(**extra):
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
            "model": "knowmux", "messages": ASK, "max_tokens": 2, "strategy": "kv", "top_k": 2, **extra})
        assert r.status_code == 200, r.text
        return r.json()["knowmux"]["kv"]

    default = kv_info()
    assert default["recompute_fraction"] == 0.5 and default["recomputed_tokens"] > 0
    zero = kv_info(kv_recompute=0)
    assert zero["recompute_fraction"] == 0 and zero["recomputed_tokens"] == 0


def test_an_experiment_arm_with_alpha_zero_runs_at_zero(make_server, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text('[experiments.trust]\narms = [{ name = "context", strategy = "rag+ckplug", ckplug_alpha = 0 }]\n')
    srv = make_server(experiments=exp)
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Experiment": "trust"}, timeout=60,
                   json={"model": "knowmux", "messages": ASK, "max_tokens": 2, "ckplug_alpha": 1})
    assert r.status_code == 200, r.text
    assert r.headers["x-experiment-arm"] == "context"
    assert r.json()["knowmux"]["ckplug"]["alpha"] == 0.0  # the arm's value wins over the request's
