"""The router (`auto`), its classifier, and A/B experiments."""

import json
import random
from collections import Counter
from types import SimpleNamespace

import httpx
import numpy as np
import pytest

from server.router import ExperimentError, Experiments, Router, RouterClassifier
from server.router.classifier import ClassifierError
from server.router.experiments import parse

KNOWN = ["auto", "direct", "rag", "rag+ckplug", "kv", "kv+ckplug", "prag", "prag+rag"]
CONFIG = """
[experiments.prag-vs-rag]
arms = [
  { name = "a", strategy = "rag", weight = 1 },
  { name = "b", strategy = "direct", weight = 3, top_k = 2 },
]
"""
DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."},
        {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}]
ASK = [{"role": "user", "content": "Where does Zorbl the cat live?"}]


# ---- experiments ---------------------------------------------------------------------------
def test_arm_assignment_is_deterministic_and_follows_the_weights():
    exp = parse(CONFIG, KNOWN)["prag-vs-rag"]
    rng = random.Random(0)
    assert all(exp.assign(f"user{i}", rng) == exp.assign(f"user{i}", rng) for i in range(200))
    counts = Counter(exp.assign(f"user-{i}", rng).name for i in range(8000))
    # weights 1:3 -> b gets 75%; binomial sd over 8000 users is 0.5 points, allow 4 sd
    assert abs(counts["b"] / 8000 - 0.75) < 0.02
    anon = Counter(exp.assign(None, random.Random(1)).name for _ in range(1))  # no user: random, still an arm
    assert set(anon) <= {"a", "b"}


@pytest.mark.parametrize("text, fragment", [
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"nope\" } ]", "unknown strategy 'nope'"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", weight = 0 } ]", "positive number"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", weight = -1 } ]", "positive number"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", weight = \"2\" } ]", "positive number"),
    ("[experiments.x]\narms = []", "non-empty list"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\" }, { name = \"a\", strategy = \"rag\" } ]",
     "used twice"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", colour = 1 } ]", "unknown parameter"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", top_k = 0 } ]", "top_k must be"),
    ("[experiments.x]\narms = [ { name = \"../a\", strategy = \"rag\" } ]", "'name' must be"),
    # an arm's options fall in the ranges a request's must (server.options)
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"kv\", kv_recompute = 1.5 } ]", "kv_recompute"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag+ckplug\", ckplug_alpha = 2 } ]", "ckplug_alpha"),
    ("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag+ckplug\", ckplug_condition = \"x\" } ]",
     "ckplug_condition"),
    ("[experiments.x\narms = 1", "line 1"),
    ("[experiments.x]\narms = [ { name = \"a\",\n strategy = rag } ]", "line 2"),
])
def test_bad_configs_are_rejected_with_the_place(text, fragment):
    with pytest.raises(ExperimentError, match=None) as e:
        parse(text, KNOWN, source="exp.toml")
    assert fragment in str(e.value) and "exp.toml" in str(e.value)


def test_a_bad_reload_keeps_the_old_config(tmp_path):
    f = tmp_path / "exp.toml"
    f.write_text(CONFIG)
    ex = Experiments(f, KNOWN, seed=0)
    f.write_text("[experiments.broken\n")
    with pytest.raises(ExperimentError):
        ex.reload()
    assert ex.get("prag-vs-rag").arms[1].weight == 3.0 and "line 1" in ex.describe()["last_error"]
    f.write_text(CONFIG.replace("weight = 3", "weight = 5"))
    assert ex.get("prag-vs-rag").arms[1].weight == 5.0  # picked up on use, by modification stamp


# ---- the classifier ------------------------------------------------------------------------
def _toy(n=300, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, dim + 4)).astype(np.float32)
    y = ["direct" if x[0] > 0.3 else "rag" if x[1] > 0 else "kv" for x in X]
    return X, y


def test_classifier_learns_and_round_trips(tmp_path):
    X, y = _toy()
    clf = RouterClassifier.fit(X, y, ["direct", "kv", "rag"], embedding_dim=8)
    acc = np.mean([clf.choose(x, clf.classes)[0] == t for x, t in zip(X, y)])
    assert acc > 0.9
    clf.save(tmp_path / "router")
    back = RouterClassifier.load(tmp_path / "router")
    assert back.classes == clf.classes
    np.testing.assert_allclose(back.probabilities(X[0]), clf.probabilities(X[0]), rtol=1e-6)
    # restricted to what is available, the choice is the best allowed class
    s, p = back.choose(X[0], ["kv"])
    assert s == "kv" and p == pytest.approx(1.0)
    assert back.choose(X[0], ["prag"]) is None
    assert RouterClassifier.load(tmp_path / "absent") is None


def test_a_corrupt_classifier_is_refused(tmp_path):
    X, y = _toy()
    RouterClassifier.fit(X, y, ["direct", "kv", "rag"], embedding_dim=8).save(tmp_path / "r")
    (tmp_path / "r" / "classifier.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(ClassifierError):
        RouterClassifier.load(tmp_path / "r")
    meta = json.loads((tmp_path / "r" / "classifier.json").read_text())
    assert "pickle" not in json.dumps(meta)


# ---- the rules, each on a constructed case -------------------------------------------------
class FakeKB:
    def __init__(self, scores):
        self.scores = scores

    def count(self):
        return len(self.scores)

    def embed_query(self, q):
        return np.ones(8, np.float32) / np.sqrt(8)

    def search_vector(self, emb, k):
        return [SimpleNamespace(doc_id=f"d{i}", score=s) for i, s in enumerate(self.scores[:k])]

    def get_many(self, ids):
        return {i: SimpleNamespace(id=i, title="", text="word " * 200) for i in ids}


def _router(scores, with_kv=False, with_adapter=False, probe=None, classifier_dir=None, rate=1000.0,
            one_passage_gap=None, tier=None):
    prompts = SimpleNamespace(count_tokens=lambda t: len(t.split()), passage_ids=lambda p: p.text.split())
    have = lambda flag: SimpleNamespace(has=lambda doc: flag(doc) if callable(flag) else flag)  # noqa: E731
    ctx = SimpleNamespace(kb=FakeKB(scores), prompts=prompts, kv=have(with_kv), prag=have(with_adapter))
    return Router(ctx, KNOWN[1:], min_score=0.25, probe=probe, classifier_dir=classifier_dir,
                  prefill_tokens_per_s=rate, one_passage_gap=one_passage_gap, tier=tier)


def test_rule_no_documents():
    d = _router([]).route(ASK, "q", 3)
    assert (d.strategy, d.rule) == ("direct", "no_documents")


def test_rule_no_good_hit():
    d = _router([0.1, 0.05]).route(ASK, "where is it", 2)
    assert (d.strategy, d.rule) == ("direct", "no_good_hit") and "0.10 < 0.25" in d.reason


def test_rule_default_is_the_most_accurate_available():
    d = _router([0.7, 0.6]).route(ASK, "where is it", 2)
    assert (d.strategy, d.rule) == ("rag", "preference")


def test_rule_latency_budget_prefers_stored_caches():
    # 2 passages x 200 tokens at 1000 tok/s: rag ~ 400 ms; the question alone ~ 15 ms
    d = _router([0.7, 0.6], with_kv=True).route(ASK, "where is it", 2, budget_ms=100)
    assert (d.strategy, d.rule) == ("kv", "budget") and "latency budget 100 ms" in d.reason
    d = _router([0.7, 0.6], with_kv=False, with_adapter=True).route(ASK, "where is it", 2, budget_ms=100)
    assert d.strategy == "prag"
    d = _router([0.7, 0.6]).route(ASK, "where is it", 2, budget_ms=100)
    assert d.strategy == "direct"
    d = _router([0.7, 0.6]).route(ASK, "where is it", 2, budget_ms=0.001)
    assert d.strategy == "direct" and "nothing fits" in d.reason
    d = _router([0.7, 0.6], with_kv=True).route(ASK, "where is it", 2, budget_ms=10_000)
    assert d.strategy == "rag"  # a generous budget changes nothing


def test_rule_confidence_probe():
    d = _router([0.7], probe=lambda m, p: -0.4).route(ASK, "q", 1)
    assert (d.strategy, d.rule) == ("rag+ckplug", "probe") and d.features.confidence_gain == -0.4
    d = _router([0.7], probe=lambda m, p: 0.3).route(ASK, "q", 1)
    assert d.strategy == "rag"


def test_rule_one_passage_when_the_top_hit_leads():
    # the top hit leads by 0.3: its cache alone (kv, exact for one passage), even if the others have none
    d = _router([0.8, 0.5, 0.4], with_kv=lambda doc: doc.id == "d0", one_passage_gap=0.2).route(ASK, "q", 3)
    assert (d.strategy, d.rule, d.top_k) == ("kv", "one_passage", 1) and "lead 0.30 >= 0.20" in d.reason
    d = _router([0.8, 0.5], one_passage_gap=0.2).route(ASK, "q", 2)  # no cache: rag with the top passage
    assert (d.strategy, d.top_k) == ("rag", 1)
    d = _router([0.8, 0.7], with_kv=True, one_passage_gap=0.2).route(ASK, "q", 2)  # close hits: all of them
    assert (d.strategy, d.rule, d.top_k) == ("rag", "preference", None)
    d = _router([0.8, 0.1], with_kv=True).route(ASK, "q", 2)  # off unless set
    assert d.rule == "preference"


def test_every_replica_loads_the_classifier_published_to_the_tier(tmp_path, capsys):
    from server.cli import main
    from server.tiers import open_tier

    X, y = _toy()
    RouterClassifier.fit(X, y, ["direct", "kv", "rag"], embedding_dim=8).save(tmp_path / "trained")
    tier_url = (tmp_path / "tier").as_uri()
    assert main(["router", "publish", str(tmp_path / "trained"), "--kv-tier", tier_url]) == 0
    assert "published router classifier" in capsys.readouterr().out
    tier = open_tier(tier_url, "router")
    replicas = [_router([0.9], classifier_dir=tmp_path / f"replica{i}", tier=tier) for i in range(2)]
    for r in replicas:  # neither had a classifier of its own
        assert r.classifier is not None and r.classifier.classes == ["direct", "kv", "rag"]
        assert r.describe()["classifier"]["source"].startswith("tier ")
    # a retrained one, published, replaces it at the next reload; a damaged object is refused and the
    # replica keeps the one it has, saying why
    RouterClassifier.fit(X, ["rag" if t == "kv" else t for t in y], ["direct", "rag"],
                         embedding_dim=8).save(tmp_path / "retrained")
    assert main(["router", "publish", str(tmp_path / "retrained"), "--kv-tier", tier_url]) == 0
    replicas[0].load_classifier()
    assert replicas[0].classifier.classes == ["direct", "rag"]
    for obj in (tmp_path / "tier" / "router").glob("*-classifier.safetensors"):
        obj.write_bytes(b"\x00garbage")
    replicas[1].load_classifier()
    assert replicas[1].classifier.classes == ["direct", "kv", "rag"] and "damaged" in replicas[1].classifier_error
    assert main(["router", "publish", str(tmp_path / "absent"), "--kv-tier", tier_url]) == 2


def test_one_passage_narrows_only_a_choice_that_reads_the_passages(tmp_path):
    # the classifier answers low-scoring questions from memory (direct) and the others with rag:
    # the one-passage rule narrows rag to the top passage, and leaves direct alone
    X = np.zeros((20, 12), np.float32)
    X[:, 8] = np.linspace(0.3, 0.9, 20)  # top_score
    RouterClassifier.fit(X, ["rag" if s > 0.6 else "direct" for s in X[:, 8]], ["direct", "rag"],
                         embedding_dim=8).save(tmp_path / "router")
    kw = dict(with_kv=True, classifier_dir=tmp_path / "router", one_passage_gap=0.1)
    d = _router([0.9, 0.3], **kw).route(ASK, "q", 2)
    assert (d.strategy, d.rule, d.top_k) == ("kv", "one_passage", 1)
    assert d.reason.startswith("classifier: rag (p=") and "one passage suffices (lead 0.60" in d.reason
    d = _router([0.35, 0.1], **kw).route(ASK, "q", 2)  # a lead of 0.25, but memory was chosen
    assert (d.strategy, d.rule, d.top_k) == ("direct", "classifier", None)


def test_rule_classifier(tmp_path):
    X = np.zeros((20, 12), np.float32)
    X[:, 8] = np.linspace(0.3, 0.9, 20)  # top_score
    y = ["kv" if s > 0.6 else "rag" for s in X[:, 8]]
    RouterClassifier.fit(X, y, ["kv", "rag"], embedding_dim=8).save(tmp_path / "router")
    d = _router([0.9], with_kv=True, classifier_dir=tmp_path / "router").route(ASK, "q", 1)
    assert (d.strategy, d.rule) == ("kv", "classifier") and d.reason.startswith("classifier: kv (p=")
    # the classifier only picks among what is available: no caches, no kv
    d = _router([0.9], with_kv=False, classifier_dir=tmp_path / "router").route(ASK, "q", 1)
    assert d.strategy == "rag"


def test_a_classifier_that_does_not_beat_its_majority_class_is_not_used(tmp_path):
    X = np.zeros((20, 12), np.float32)
    X[:, 8] = np.linspace(0.3, 0.9, 20)
    clf = RouterClassifier.fit(X, ["kv" if s > 0.6 else "rag" for s in X[:, 8]], ["kv", "rag"], embedding_dim=8)
    clf.info.update(cv_label_accuracy=0.46, majority_share=0.64, one_passage_gap=0.2)  # as a real run measured
    clf.save(tmp_path / "router")
    r = _router([0.9], with_kv=True, classifier_dir=tmp_path / "router")
    assert r.classifier is None and "does not beat its majority class (0.64)" in r.classifier_error
    assert r.one_passage_gap == 0.2  # the trainer's one-passage rule is a rule of its own: kept
    assert r.route(ASK, "q", 1).rule == "preference"
    clf.info.update(cv_label_accuracy=0.83, majority_share=0.53)  # one that does: used
    clf.save(tmp_path / "router")
    assert _router([0.9], with_kv=True, classifier_dir=tmp_path / "router").route(ASK, "q", 1).rule == "classifier"


# ---- over HTTP -----------------------------------------------------------------------------
@pytest.fixture
def server(make_server, tmp_path):
    exp = tmp_path / "exp.toml"
    exp.write_text(CONFIG)
    srv = make_server(experiments=exp)
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    srv.exp_file = exp
    return srv


def _chat(srv, headers=None, **body):
    return httpx.post(srv.url + "/v1/chat/completions", headers=headers or {},
                      json={"model": "knowmux", "messages": ASK, "max_tokens": 2, **body}, timeout=60)


def test_experiment_arms_headers_metrics_and_counts(server):
    arms = {}
    for user in ("ann", "bob", "cy", "dee", "eve", "fay"):
        r = _chat(server, {"X-Experiment": "prag-vs-rag"}, user=user)
        assert r.status_code == 200, r.text
        assert r.headers["x-experiment"] == "prag-vs-rag"
        arm = r.headers["x-experiment-arm"]
        assert r.headers["x-strategy"] == {"a": "rag", "b": "direct"}[arm]
        assert r.headers["x-route-reason"] == f"experiment prag-vs-rag arm {arm}"
        arms[user] = arm
        again = _chat(server, {"X-Experiment": "prag-vs-rag", "X-User-Id": user})
        assert again.headers["x-experiment-arm"] == arm  # X-User-Id keys the same assignment as `user`
    info = httpx.get(server.url + "/v1/experiments").json()
    counts = {a["name"]: a["requests"] for a in info["experiments"][0]["arms"]}
    assert sum(counts.values()) == 12
    m = httpx.get(server.url + "/metrics").text
    for arm, strategy in (("a", "rag"), ("b", "direct")):
        if arm in arms.values():
            assert f'knowmux_requests_total{{arm="{arm}",experiment="prag-vs-rag",status="200",strategy="{strategy}"}}' in m
            assert f'knowmux_time_to_first_token_seconds_count{{arm="{arm}",experiment="prag-vs-rag",strategy="{strategy}"}}' in m


def test_explicit_strategy_overrides_the_experiment(server):
    r = _chat(server, {"X-Experiment": "prag-vs-rag", "X-Strategy": "direct"}, user="ann")
    assert r.headers["x-strategy"] == "direct"
    assert r.headers["x-route-reason"] == "explicit strategy (header) overrides experiment prag-vs-rag"
    assert "x-experiment-arm" not in r.headers
    r = _chat(server, strategy="rag")
    assert r.headers["x-strategy"] == "rag" and r.headers["x-route-reason"] == "explicit strategy (body)"


@pytest.mark.parametrize("headers, body, param, code", [
    ({"X-Experiment": "nope"}, {}, "X-Experiment", "unknown_experiment"),
    ({"X-Latency-Budget-Ms": "fast"}, {}, "X-Latency-Budget-Ms", "invalid_value"),
    ({"X-Latency-Budget-Ms": "-5"}, {}, "X-Latency-Budget-Ms", "invalid_value"),
    ({"X-Latency-Budget-Ms": "nan"}, {}, "X-Latency-Budget-Ms", None),
    ({"X-Strategy": "bogus"}, {}, "strategy", "unknown_strategy"),
])
def test_bad_routing_input_is_a_clear_400(server, headers, body, param, code):
    r = _chat(server, headers, **body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if code:
        assert err["code"] == code
    m = httpx.get(server.url + "/metrics").text
    assert "knowmux_request_errors_total{" in m


def test_latency_budget_over_http_routes_and_says_why(server):
    r = _chat(server, {"X-Latency-Budget-Ms": "0.01"})
    assert r.status_code == 200 and r.headers["x-strategy"] == "direct"
    assert "latency budget 0.01 ms" in r.headers["x-route-reason"]


def test_one_passage_rule_reaches_the_strategy(make_server):
    """The router's narrowing is what the strategy retrieves: one passage, said in the headers."""
    srv = make_server(router_one_passage_gap=0.0)  # any lead: always narrow
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    r = _chat(srv, top_k=2)
    assert r.status_code == 200, r.text
    assert "one passage suffices" in r.headers["x-route-reason"] and r.headers["x-strategy"] == "rag"
    assert len(r.json()["knowmux"]["retrieved"]) == 1
    assert httpx.get(srv.url + "/v1/router").json()["rules"]["one_passage_gap"] == 0.0


def test_experiments_reload_endpoint_rejects_a_bad_file_and_keeps_the_old(server):
    server.exp_file.write_text("[experiments.x]\narms = [ { name = \"a\", strategy = \"rag\", weight = 0 } ]\n")
    r = httpx.post(server.url + "/v1/experiments/reload")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_experiments"
    assert "positive number" in r.json()["error"]["message"]
    assert _chat(server, {"X-Experiment": "prag-vs-rag"}, user="ann").status_code == 200
    info = httpx.get(server.url + "/v1/experiments").json()
    assert info["last_error"] and info["experiments"][0]["name"] == "prag-vs-rag"


def test_probe_runs_on_the_engine(make_server):
    srv = make_server(router_probe=True)
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    r = _chat(srv)
    assert r.status_code == 200
    assert r.headers["x-strategy"] in ("rag", "rag+ckplug")
    gain = srv.runtime.router.probe(ASK, [])
    assert np.isfinite(gain)


def test_router_train_from_a_bench_run(tmp_path, embedder):
    from indexes import KnowledgeBase
    from indexes.store import Document
    from server.router.train import main

    data = tmp_path / "data"
    kb = KnowledgeBase(data, embedder)
    kb.upsert([Document(d["id"], d["text"], d["title"]) for d in DOCS])
    kb.close()
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"dataset": "toy", "data_dir": str(data),
                                                  "settings": {"top_k": 1}}))
    recs = []
    for i in range(12):
        q = f"Where does Zorbl live, take {i}?" if i % 2 else f"What is the capital of France, take {i}?"
        for s, lat in (("direct", 1.0), ("rag", 2.0)):
            ok = (s == "direct") == (i % 2 == 0)  # France: direct knows it; Zorbl: only rag
            recs.append({"strategy": s, "id": f"q{i}", "question": q, "kind": "questions", "contains": float(ok),
                         "latency_s": lat, "error": None})
    (run / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
    assert main(["--from", str(run), "--out", str(tmp_path / "router")]) == 0
    clf = RouterClassifier.load(tmp_path / "router")
    assert clf.classes == ["direct", "rag"] and clf.info["labels"] == {"rag": 6, "direct": 6}
    assert main(["--from", str(tmp_path / "nothing"), "--out", str(tmp_path / "r2")]) == 2

    # a run with one passage per question calibrates the one-passage rule: here kv with the
    # top passage answers what rag answers, faster; every lead tried narrows every question
    # (two documents: the gaps are wide), and the most conservative of equals is kept
    meta = json.loads((run / "results.json").read_text())
    meta["settings"]["top_k"] = 2
    (run / "results.json").write_text(json.dumps(meta))
    one = tmp_path / "one"
    one.mkdir()
    (one / "results.json").write_text(json.dumps({**meta, "settings": {"top_k": 1}}))
    rag_wins = [dict(r, contains=float(r["strategy"] == "rag" or r["id"] in ("q0", "q2"))) for r in recs]
    (run / "results.jsonl").write_text("\n".join(json.dumps(r) for r in rag_wins))
    one_recs = [dict(r, contains=float(r["strategy"] == "rag" or r["id"] in ("q0", "q2")), strategy="kv",
                     latency_s=1.2) for r in recs if r["strategy"] == "rag"]
    (one / "results.jsonl").write_text("\n".join(json.dumps(r) for r in one_recs))
    assert main(["--from", str(run), "--one-passage-from", str(one), "--out", str(tmp_path / "r3")]) == 0
    info = RouterClassifier.load(tmp_path / "r3").info
    assert info["one_passage_gap"] == 0.4 and info["one_passage_calibration"][0]["best_fixed"] == "rag"
    ctx = SimpleNamespace(kb=None, prompts=None, kv=None, prag=None)
    assert Router(ctx, KNOWN[1:], classifier_dir=tmp_path / "r3").one_passage_gap == 0.4
    assert Router(ctx, KNOWN[1:], classifier_dir=tmp_path / "r3", one_passage_gap=0.3).one_passage_gap == 0.3
    # when the one-passage answers are slower than the best fixed strategy, the rule stays off
    (one / "results.jsonl").write_text("\n".join(json.dumps(dict(r, latency_s=9.0)) for r in one_recs))
    assert main(["--from", str(run), "--one-passage-from", str(one), "--out", str(tmp_path / "r4")]) == 0
    assert RouterClassifier.load(tmp_path / "r4").info["one_passage_gap"] is None
    # a calibration on the data beats the one shipped for the model, even when it found no gap
    assert Router(ctx, KNOWN[1:], classifier_dir=tmp_path / "r4", model_id="SmolLM2-135M-Instruct").one_passage_gap \
        is None


def test_the_fallback_label_is_a_strategy_run_on_that_data_set():
    from server.router.train import label

    # prag is the cheapest strategy overall but was never run on "b", where nothing is right
    items = {("a", "q1", 0): {"outcomes": {"prag": True, "rag": True}},
             ("b", "q1", 0): {"outcomes": {"direct": False, "rag": False}},
             ("b", "q2", 0): {"outcomes": {"direct": False, "rag": False}}}
    keys, labels, order, fallback = label(items, {"prag": 0.5, "direct": 0.8, "rag": 1.2})
    assert fallback == {"a": "prag", "b": "direct"} and labels == ["prag", "direct", "direct"]


def test_the_embedded_model_answers_from_one_passage_out_of_the_box():
    """SmolLM2-135M-Instruct answers best from one passage wherever it was measured, so with
    no setting and no calibrated classifier `auto` narrows to the top passage for it; any
    other model keeps the rule off until calibrated; the server's setting wins."""
    ctx = SimpleNamespace(kb=FakeKB([0.8, 0.79, 0.5]), prompts=SimpleNamespace(count_tokens=lambda t: len(t.split())),
                          kv=SimpleNamespace(has=lambda doc: True), prag=SimpleNamespace(has=lambda doc: False))
    smol = Router(ctx, KNOWN[1:], model_id="SmolLM2-135M-Instruct")
    assert smol.one_passage_gap == 0.0 and smol.describe()["rules"]["one_passage_source"] == \
        "measured for SmolLM2-135M-Instruct"
    d = smol.route(ASK, "q", 3)
    assert (d.strategy, d.rule, d.top_k) == ("kv", "one_passage", 1)
    other = Router(ctx, KNOWN[1:], model_id="Llama-3.1-8B-Instruct")
    assert other.one_passage_gap is None and other.route(ASK, "q", 3).rule != "one_passage"
    assert Router(ctx, KNOWN[1:], model_id="SmolLM2-135M-Instruct", one_passage_gap=2.0).route(ASK, "q", 3).rule \
        != "one_passage"  # no lead between cosine scores reaches 2: the setting turns the rule off

