"""A request's options travel from the wire to the strategy unchanged: ``None`` alone means
"not given". A 0, 0.0, False or "" is a value (``0 == False`` in Python: a truthiness
filter once turned ``ckplug_alpha: 0`` into ``adaptive`` and ``kv_recompute: 0`` into the
server's default)."""

import operator

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request

from server.api.chat import to_input
from server.api.protocol import ChatCompletionRequest
from server.options import STRATEGY_OPTIONS

DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."}]
ASK = [{"role": "user", "content": "Where does Zorbl live?"}]

# every strategy option with the valid values a client may send, zeros and falses first
OPTION_VALUES = {
    "ckplug_alpha": st.one_of(st.sampled_from([0, 0.0, 1, 1.0, "adaptive"]), st.floats(0, 1), st.integers(0, 1)),
    "ckplug_condition": st.sampled_from(["paper", "code"]),
    "ckplug_epsilon": st.one_of(st.sampled_from([0, 0.0, -1]), st.floats(-5, 0)),
    "ckplug_variant": st.sampled_from(["paper", "kept-set"]),
    "ckplug_trace": st.booleans(),
    "on_missing": st.sampled_from(["build", "skip", "error"]),
    "kv_recompute": st.one_of(st.sampled_from([0, 0.0, 1.0]), st.floats(0, 1)),
    "kv_recompute_refresh": st.booleans(),
    "kv_link_tokens": st.one_of(st.sampled_from([0, 4096]), st.integers(0, 64)),
    "kv_positions": st.sampled_from(["sequential", "parallel"]),
    "kv_temperature": st.one_of(st.sampled_from([1, 1.0, 2, 0.01]), st.floats(0.01, 2)),
    "kv_scale": st.one_of(st.sampled_from([1, 1.0, 2, 0.01]), st.floats(0.01, 2)),
    "adapters": st.sampled_from([[], [{"doc_id": "a", "scale": 0}], [{"doc_id": "a", "scale": 0.0}]]),
}
# the ChatInput fields that a request field fills, with the valid values a client may send
INPUT_VALUES = {
    "top_k": ("top_k", st.integers(1, 30)),
    "max_tokens": ("sampling.max_tokens", st.integers(1, 100)),
    "temperature": ("sampling.temperature", st.sampled_from([0, 0.0, 0.7, 2])),
    "top_p": ("sampling.top_p", st.sampled_from([1, 0.5, 1e-9])),
    "seed": ("sampling.seed", st.integers(-5, 5)),
    "presence_penalty": ("sampling.presence_penalty", st.sampled_from([0, 0.0, -2, 1.5])),
    "frequency_penalty": ("sampling.frequency_penalty", st.sampled_from([0, 0.0, -2, 1.5])),
    "ignore_eos": ("sampling.ignore_eos", st.booleans()),
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
            assert operator.attrgetter(field)(inp) == sent[k], k
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


@pytest.mark.parametrize("field, bad", [("ckplug_alpha", -0.1), ("ckplug_alpha", 1.5), ("ckplug_alpha", "high"),
                                        ("ckplug_alpha", True), ("ckplug_alpha", "NaN"), ("kv_recompute", -0.1),
                                        ("kv_recompute", 1.5), ("ckplug_condition", "vibes"), ("on_missing", "x"),
                                        ("kv_recompute_refresh", "yes"), ("kv_recompute_refresh", 1),
                                        ("top_k", 0), ("n", 0), ("n", 9), ("top_logprobs", 21),
                                        ("kv_link_tokens", -1), ("kv_temperature", 0), ("kv_scale", 2.5),
                                        ("kv_positions", "diagonal")])
def test_a_value_out_of_range_is_refused_at_the_wire_naming_the_field(field, bad):
    from pydantic import ValidationError

    with pytest.raises(ValidationError) as e:
        ChatCompletionRequest(model="knowmux", messages=ASK, **{field: float(bad) if bad == "NaN" else bad})
    assert [err["loc"] for err in e.value.errors()] == [(field,)]


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
    refreshed = kv_info(kv_recompute_refresh=True)  # on the server's fraction, chosen again layer by layer
    assert refreshed["recompute_refresh"] is True and refreshed["recomputed_tokens"] > 0


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
