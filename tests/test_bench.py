"""The benchmark: metrics by hand, loaders on real records, one end-to-end run on a tiny model."""

import json
import os
from pathlib import Path

import pytest

from bench import metrics as M
from bench.datasets import DatasetError, load, load_generic

DATA_ROOT = Path(os.environ.get("KNOWMUX_DATA_ROOT", Path(__file__).resolve().parents[1].parent / "shared" / "data"))


def test_normalisation_em_f1_and_containment():
    assert M.normalize("The  Eiffel-Tower!") == "eiffeltower"
    assert M.normalize("An apple, a pear and THE plum.") == "apple pear and plum"
    assert M.exact_match("the Paris.", ["Paris", "Lutetia"]) == 1.0
    assert M.exact_match("Paris, France", ["Paris"]) == 0.0
    # pred "wilhelm conrad rontgen won" vs gold "wilhelm conrad rontgen": p = 3/4, r = 1, F1 = 6/7
    assert M.f1("Wilhelm Conrad Rontgen won", ["Wilhelm Conrad Rontgen"]) == pytest.approx(6 / 7)
    assert M.f1("nothing", ["Paris", "nothing at all"]) == pytest.approx(2 * (1 * 1 / 3) / (1 + 1 / 3))
    assert M.contains("It was won by Wilhelm Conrad Röntgen in 1901.", ["Wilhelm Conrad Röntgen"]) == 1.0
    assert M.contains("Parisian cafes", ["Paris"]) == 0.0  # whole tokens only
    assert M.contains("anything", [""]) == 0.0


def test_memory_recall_and_percentiles():
    s = M.conflict_scores([("Tampa, Florida", ["Tampa"], ["Glendale"]),
                           ("Glendale it is", ["Tampa"], ["Glendale"]),
                           ("Glendale, not Tampa", ["Tampa"], ["Glendale"]),
                           ("no idea", ["Tampa"], ["Glendale"])])
    assert (s["po"], s["ps"], s["n"]) == (2, 2, 4)
    assert s["memory_recall"] == 0.5 and s["memory_rate"] == 0.5 and s["context_recall"] == 0.5
    assert M.conflict_scores([("x", ["a"], ["b"])])["memory_recall"] is None
    assert M.percentile([1, 2, 3, 4], 50) == 2.5 and M.percentile([1, 2, 3, 4], 95) == pytest.approx(3.85)
    assert M.percentile([], 50) is None
    assert M.recall_at_k(["a", "b", "c"], ["b", "z"]) == 0.5 and M.recall_at_k(["a"], []) is None


needs_data = pytest.mark.skipif(not DATA_ROOT.is_dir(), reason=f"evaluation data not found at {DATA_ROOT}")


@needs_data
@pytest.mark.parametrize("name", ["nq_open_oracle", "hotpotqa_train100", "musique_train100", "rgb_en_fact",
                                  "conflictqa_strategyqa", "memotrap"])
def test_loaders_on_real_records(name):
    ds = load(name, DATA_ROOT)
    ids = {d["id"] for d in ds.corpus}
    if ds.questions:
        q = ds.questions[0]
        assert q.question and q.answers and all(g in ids for g in q.gold_doc_ids)
    if ds.conflicts:
        c = ds.conflicts[0]
        assert c.question and c.context_answers and c.memory_answers
    if name == "rgb_en_fact":
        c = ds.conflicts[0]
        assert c.memory_answers == ["Tampa, Florida"] and c.context_answers == ["Glendale, Arizona"]
        assert "Glendale, Arizona" in c.context
    if name == "nq_open_oracle":
        assert len(ds.questions) == 2000 and ds.questions[0].answers == ["Wilhelm Conrad Röntgen"]


def test_bundled_sample_loads_without_shared_data(tmp_path):
    ds = load("nq_open_sample", tmp_path / "nowhere")
    assert len(ds.questions) == 200 and len(ds.corpus) == 199


def test_bad_data_stops_with_a_reason(tmp_path):
    with pytest.raises(DatasetError, match="unknown dataset"):
        load("nope", tmp_path)
    with pytest.raises(DatasetError, match="no such file"):
        load("rgb_en_fact", tmp_path)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"id": "1", "question": "q?"}\n')
    with pytest.raises(DatasetError, match="answers"):
        load_generic(None, bad, None)


def test_end_to_end_run_writes_all_outputs(make_server, tmp_path):
    from bench.run import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text("\n".join(json.dumps(d) for d in [
        {"id": "a", "title": "Zorbl", "text": "Zorbl is a purple cat."},
        {"id": "b", "title": "Paris", "text": "Paris is the capital of France."}]) + "\n")
    questions = tmp_path / "q.jsonl"
    questions.write_text(json.dumps({"id": "q1", "question": "What colour is Zorbl?", "answers": ["purple"],
                                     "gold_doc_ids": ["a"]}) + "\n")
    conflicts = tmp_path / "k.jsonl"
    conflicts.write_text(json.dumps({"id": "k1", "question": "Capital of France?", "context": "Lyon is the "
                                     "capital of France.", "context_answers": ["Lyon"],
                                     "memory_answers": ["Paris"]}) + "\n")
    srv = make_server()
    out = tmp_path / "out"
    rc = main(["--url", srv.url, "--corpus", str(corpus), "--questions", str(questions), "--conflicts",
               str(conflicts), "--strategies", "direct,rag,kv,prag,rag+ckplug,auto,telepathy", "--alphas", "0,1", "--max-tokens", "4",
               "--concurrency", "2", "--kv-variant", "kv_positions=parallel,kv_temperature=0.5", "--out", str(out)])
    assert rc == 0
    result = json.loads((out / "results.json").read_text())
    assert result["unavailable"] == ["telepathy"]
    labels = {(r["label"], r["kind"], r["concurrency"]) for r in result["runs"]}
    assert ("rag", "questions", 1) in labels and ("rag+ckplug (alpha=0.0)", "conflicts", 1) in labels
    assert ("rag", "questions", 2) in labels
    auto = next(r for r in result["runs"] if r["label"] == "auto" and r["kind"] == "questions")
    assert auto["failures"] == 0 and sum(auto["routed"].values()) == auto["n"]  # what the router chose, counted
    rag = next(r for r in result["runs"] if r["label"] == "rag" and r["kind"] == "questions")
    assert rag["recall_at_k"] == 1.0 and rag["failures"] == 0 and rag["ttft_p50_s"] > 0
    kv = next(r for r in result["runs"] if r["label"] == "kv" and r["kind"] == "questions")
    assert kv["failures"] == 0 and result["build"]["kv"]["built"] >= 1
    ape = next(r for r in result["runs"] if r["label"] == "kv [kv_positions=parallel,kv_temperature=0.5]")
    assert ape["failures"] == 0 and ape["n"] == kv["n"]  # the variant ran on the same questions
    prag = next(r for r in result["runs"] if r["label"] == "prag" and r["kind"] == "questions")
    assert prag["failures"] == 0 and result["build"]["adapters"]["built"] >= 1
    lines = (out / "results.jsonl").read_text().splitlines()
    assert all("output" in json.loads(line) for line in lines)
    assert "| rag |" in (out / "report.md").read_text()
    assert (out / "accuracy_vs_latency.png").stat().st_size > 1000
    assert (out / "memory_recall_vs_alpha.png").stat().st_size > 1000


def test_unreachable_server_stops_at_once(tmp_path, capsys):
    from bench.run import main

    rc = main(["--url", "http://127.0.0.1:9", "--dataset", "nq_open_sample", "--out", str(tmp_path)])
    assert rc == 2 and "cannot reach" in capsys.readouterr().err


def test_an_interrupted_bench_cancels_the_build_job_it_started(make_server, monkeypatch):
    """Ctrl-C while the bench follows a build: the job is cancelled on the server, so a
    restarted server does not resume it ahead of the next run's own builds."""
    import threading

    import httpx

    from bench import run
    from server.jobs import Builder

    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": "a", "text": "Zorbl is a purple cat."}]})
    release = threading.Event()
    monkeypatch.setattr(srv.runtime, "builder", lambda kind: Builder(lambda ids: [release.wait(10)] * len(ids)))

    def interrupted(_):
        raise KeyboardInterrupt

    import time
    import types

    # only the bench's own clock is patched (its module's ``time``), not the server threads'
    monkeypatch.setattr(run, "time", types.SimpleNamespace(sleep=interrupted, perf_counter=time.perf_counter,
                                                           time=time.time))
    with pytest.raises(KeyboardInterrupt):
        run.build(srv.url, "kv", ["a"])
    release.set()
    jobs = httpx.get(srv.url + "/v1/jobs").json()["data"]
    assert [j["status"] for j in jobs] == ["cancelled"]


def test_serve_ab_variants_parse_into_environments():
    from bench.serve_ab import parse_variant

    assert parse_variant("default") == ("default", {})
    assert parse_variant("old:PYTHONPATH=/x,OMP_WAIT_POLICY=PASSIVE") == \
        ("old", {"PYTHONPATH": "/x", "OMP_WAIT_POLICY": "PASSIVE"})
    with pytest.raises(SystemExit):
        parse_variant("bad:NOVALUE")


def test_interrupting_a_run_stops_asking(monkeypatch):
    import time

    import bench.run as R

    asked = []

    def ask(client, strategy, question, *a):
        asked.append(question)
        if len(asked) == 1:
            raise KeyboardInterrupt  # as Ctrl-C reaches the waiting main thread
        time.sleep(0.01)
        return {}

    monkeypatch.setattr(R, "ask", ask)
    items = [type("Q", (), {"id": str(i), "question": str(i)})() for i in range(200)]
    with pytest.raises(KeyboardInterrupt):
        R.run_items("http://127.0.0.1:9", "direct", items, 4, 1, {})
    time.sleep(0.1)
    assert len(asked) <= 2, f"{len(asked)} questions asked after Ctrl-C"


def test_subset_scores_a_range_of_questions_per_strategy():
    from bench.subset import subset

    recs = [{"strategy": s, "contains": float(i % 2 == 0 or s == "auto"), "f1": 0.5, "em": 0.0, "latency_s": 1.0 + i,
             "ttft_s": 0.1, "routed": "kv" if s == "auto" else None, "error": None}
            for s in ("rag", "auto") for i in range(6)]
    out = subset(recs, 2, 6)
    assert out["rag"]["n"] == 4 and out["rag"]["contains"] == 0.5 and out["rag"]["latency_p50_s"] == 4.5
    assert out["auto"]["contains"] == 1.0 and out["auto"]["routed"] == {"kv": 4}
    # a failure scores zero, as in the run's own report, and has no latency
    recs[2].update(contains=0.0, error="boom", latency_s=99.0)
    out = subset(recs, 2, 6)
    assert out["rag"]["n"] == 4 and out["rag"]["failures"] == 1 and out["rag"]["contains"] == 0.25
    assert out["rag"]["latency_p50_s"] == 5.0


def test_batching_records_the_kernels_a_server_chose():
    # bench.batching reads the server's knowmux_gemm_kernel gauge back into its JSON
    from prometheus_client import generate_latest

    from bench.batching import gemm_kernels
    from server.metrics import Metrics

    class Engine:
        class runner:
            kernels = {(960, 576): ["onednn_packed", "onednn", "onednn", "mkl"]}

        def stats(self):
            return {"queue": 0, "running": 0}

    m = Metrics()
    m.bind_engine(Engine())
    assert gemm_kernels(generate_latest(m.registry).decode()) == {
        "960x576": {"1": "onednn_packed", "8": "onednn", "64": "onednn", "512": "mkl"}}


def test_compare_times_both_ways_and_checks_the_answers_agree(make_server):
    import httpx

    from bench.compare import run

    srv = make_server()
    r = httpx.post(srv.url + "/v1/documents", json={"documents": [
        {"id": "a", "title": "Zorbl", "text": "Zorbl is a purple cat."}]})
    assert r.status_code == 200
    res = run(srv.url, ["What colour is Zorbl?", "Who is Zorbl?"], ["direct", "rag", "rag+ckplug"], 6)
    assert res["questions"] == 2 and res["identical_answers"] == 2  # batched together, as alone
    assert len(res["one_request_each_s"]) == len(res["one_request_all_s"]) == 2 and res["speedup_median"] > 0


def test_gpu_check_rehearses_every_strategy_on_the_cpu(tmp_path):
    """bench/gpu_check.sh cannot run here for real (no GPU); its dry run walks the same
    steps on the CPU with a tiny model: serve, add documents, build, ask every strategy."""
    import subprocess
    import sys

    from tests.tiny import tiny_model_folder

    model = tiny_model_folder(tmp_path / "tiny")
    out = tmp_path / "check.json"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    r = subprocess.run(["bash", "bench/gpu_check.sh", "--dry-run", "--engines", "torch", "--model", str(model),
                        "--out", str(out)], capture_output=True, text=True, timeout=600, env=env,
                       cwd=Path(__file__).resolve().parent.parent)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = {row["strategy"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"direct", "rag", "rag+ckplug", "kv", "kv+ckplug", "prag", "prag+rag", "auto"}
    for name, row in rows.items():
        assert row["n"] == 2 and not row["failures"] and row["ttft_ms_p50"] > 0, (name, row)
        assert row["device"] == "cpu" and row["dtype"] == "float32"
    assert "ttft p50 ms" in r.stdout
    refused = subprocess.run(["bash", "bench/gpu_check.sh", "--engines", "torch"], capture_output=True, text=True,
                             env={**env, "CUDA_VISIBLE_DEVICES": ""}, cwd=Path(__file__).resolve().parent.parent)
    assert refused.returncode == 2 and "--dry-run" in refused.stderr


def test_agreement_compares_two_runs_per_label(tmp_path):
    """bench.agreement: identical answers, the same first 8 words, the same verdict."""
    from bench.agreement import compare, load, main

    def run(name, outputs, contains, conflict):
        d = tmp_path / name
        d.mkdir()
        recs = [{"kind": "questions", "label": "rag", "id": f"q{i}", "output": o, "contains": c}
                for i, (o, c) in enumerate(zip(outputs, contains))]
        recs.append({"kind": "conflicts", "label": "rgb", "id": "c0", **conflict})  # RGB-like: memory vs context
        (d / "results.jsonl").write_text("\n".join(json.dumps(r) for r in recs))
        (d / "results.json").write_text(json.dumps({"dtype": name, "device": "cpu"}))
        return d

    words = "one two three four five six seven eight"
    a = run("float32", [f"{words} nine", "Paris is the capital", " same "], [1.0, 1.0, 0.0],
            {"output": "Paris", "has_memory": True, "has_context": False})
    b = run("bfloat16", [f"{words} ten", "Lyon is the capital", "same"], [1.0, 0.0, 0.0],
            {"output": "Lyon", "has_memory": False, "has_context": True})
    conflicts = compare(load(a), load(b))["rgb"]  # a conflict's verdict: which of its two answers it holds
    assert (conflicts["n"], conflicts["same"], conflicts["same_verdict"], conflicts["contains_a"],
            conflicts["contains_b"]) == (1, 0, 0, 1, 0)
    res = compare(load(a), load(b))["rag"]
    assert (res["n"], res["same"], res["same_start"], res["same_verdict"]) == (3, 1, 2, 2)
    assert res["contains_a"] == 2 and res["contains_b"] == 1 and abs(res["agreement"] - 1 / 3) < 1e-9
    main([str(a), str(b), "--out", str(tmp_path / "out.json")])
    assert json.loads((tmp_path / "out.json").read_text())["strategies"]["rag"]["same_start"] == 2


def test_kv_variant_reads_numbers_and_booleans():
    from bench.run import _kv_variant

    assert _kv_variant("kv_recompute=0.3,kv_recompute_refresh=true,kv_link_tokens=4,kv_positions=parallel") == {
        "kv_recompute": 0.3, "kv_recompute_refresh": True, "kv_link_tokens": 4, "kv_positions": "parallel"}
    assert _kv_variant("kv_recompute_refresh=False") == {"kv_recompute_refresh": False}
