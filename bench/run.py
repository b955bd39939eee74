"""knowmux bench: latency and accuracy of every strategy, through the HTTP API.

    knowmux bench --dataset nq_open_oracle --n 200 --strategies direct,rag,rag+ckplug --out runs/nq
    knowmux bench --corpus c.jsonl --questions q.jsonl --conflicts k.jsonl --strategies direct,rag --out runs/mine

Every request goes through the official openai client with the strategy in the
X-Strategy header, streaming (for time to first token), greedy. Without --url a server
is started on loopback (``knowmux serve``) with a fresh data dir, or with --data-dir
to reuse one. Writes OUT/results.json, results.jsonl, report.md and PNG plots.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from bench import metrics as M
from bench.datasets import DISTRACTORS, Conflict, Dataset, DatasetError, Question, load, load_generic

DEFAULT_ALPHAS = "0,0.25,0.5,0.75,1,adaptive"


class BenchError(RuntimeError):
    pass


# the knowmux beside this Python (a venv), else the one on PATH (an image's system Python)
KNOWMUX = str(Path(sys.executable).with_name("knowmux")) if Path(sys.executable).with_name("knowmux").exists() \
    else (shutil.which("knowmux") or "knowmux")
SAMPLE_CORPUS = Path(__file__).parent / "data" / "nq_open_sample" / "corpus.jsonl"


# ---- the server ----------------------------------------------------------------------
class Server:
    """A knowmux server this run started (or None for --url)."""

    def __init__(self, data_dir: Path, model: Optional[str], log_path: Path, extra_args: Sequence[str] = ()):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        cmd = [KNOWMUX, "serve", "--data-dir", str(data_dir), "--port", str(port), "--log-level", "warning",
               *(["--model", model] if model else []), *extra_args]
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "HF_HUB_OFFLINE": "1"})

    def wait(self, timeout: float = 600) -> None:
        import httpx

        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"the server exited with code {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise BenchError(f"the server did not start within {timeout:.0f} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ingest_sample(data_dir) -> None:
    """`knowmux ingest` the bundled NQ sample corpus into ``data_dir`` (the speed benchmarks' corpus)."""
    subprocess.run([KNOWMUX, "ingest", str(SAMPLE_CORPUS), "--data-dir", str(data_dir)], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})


def server_info(url: str) -> dict:
    import httpx

    try:
        models = httpx.get(url + "/v1/models", timeout=10).json()["data"][0]
    except (httpx.HTTPError, KeyError, IndexError, ValueError) as e:
        raise BenchError(f"cannot reach a knowmux server at {url} ({type(e).__name__})") from None
    return models


def ingest(url: str, docs: list[dict], batch: int = 100) -> float:
    """POST the documents; returns the seconds it took."""
    import httpx
    from tqdm import tqdm

    t0 = time.perf_counter()
    with httpx.Client(timeout=600) as http, tqdm(total=len(docs), desc="ingest", unit="doc") as bar:
        for i in range(0, len(docs), batch):
            r = http.post(url + "/v1/documents", json={"documents": docs[i:i + batch]})
            if r.status_code != 200:
                raise BenchError(f"ingest failed: {r.status_code} {r.text[:200]}")
            bar.update(len(docs[i:i + batch]))
    return time.perf_counter() - t0


def retrievable(url: str, questions: list[str], top_k: int) -> list[str]:
    """The documents the questions retrieve (only those need per-document builds)."""
    import httpx

    seen: dict[str, None] = {}
    with httpx.Client(timeout=120) as http:
        for q in questions:
            r = http.post(url + "/v1/retrieve", json={"query": q, "top_k": top_k})
            if r.status_code != 200:
                raise BenchError(f"retrieve failed: {r.status_code} {r.text[:200]}")
            seen.update((d["id"], None) for d in r.json()["data"])
    return list(seen)


def build(url: str, kind: str, doc_ids: list[str]) -> dict:
    """Start a build job and follow it to the end; returns the job's final view and wall time."""
    import httpx
    from tqdm import tqdm

    t0 = time.perf_counter()
    with httpx.Client(timeout=60) as http:
        r = http.post(url + "/v1/builds", json={"kind": kind, "doc_ids": doc_ids})
        if r.status_code != 200:
            raise BenchError(f"{kind} build refused: {r.status_code} {r.text[:200]}")
        job = r.json()
        try:
            with tqdm(total=job["total"], desc=f"build {kind}", unit="doc") as bar:
                while job["status"] in ("queued", "running"):
                    time.sleep(0.5)
                    job = http.get(url + f"/v1/jobs/{job['id']}").json()
                    bar.update(job["done"] - bar.n)
        except BaseException:  # Ctrl-C or a failure here: the job would otherwise resume at the next start
            http.post(url + f"/v1/jobs/{job['id']}/cancel")
            raise
    if job["status"] != "done":
        raise BenchError(f"{kind} build failed: {job.get('errors', [])[:3]}")
    job["wall_s"] = time.perf_counter() - t0
    return job


# ---- asking ----------------------------------------------------------------------------
def ask(client, strategy: str, question: str, max_tokens: int, top_k: int, extra: dict) -> dict:
    """One streamed request; returns output, timings, usage and the knowmux field, or an error."""
    import openai

    t0 = time.perf_counter()
    rec: dict = {"strategy": strategy, **{k: v for k, v in extra.items() if k.startswith("ckplug_")}}
    try:
        stream = client.chat.completions.create(
            model="knowmux", messages=[{"role": "user", "content": question}], max_tokens=max_tokens, temperature=0,
            stream=True, extra_headers={"X-Strategy": strategy}, extra_body={"top_k": top_k, **extra})
        parts, ttft, last = [], None, None
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                parts.append(chunk.choices[0].delta.content)
            if chunk.model_extra and "knowmux" in chunk.model_extra:
                last = chunk
        latency = time.perf_counter() - t0
        kx = last.model_extra["knowmux"] if last is not None else {}
        usage = last.usage if last is not None and last.usage else None
        rec.update(output="".join(parts), ttft_s=ttft if ttft is not None else latency, latency_s=latency,
                   prompt_tokens=usage.prompt_tokens if usage else None,
                   completion_tokens=usage.completion_tokens if usage else None,
                   retrieved=[d["id"] for d in kx.get("retrieved", [])], server_timings_ms=kx.get("timings_ms", {}),
                   routed=kx.get("strategy"), route_reason=kx.get("route_reason"), error=None)
    except openai.APIError as e:
        rec.update(output="", error=f"{type(e).__name__}: {getattr(e, 'message', str(e))}"[:500])
    return rec


def run_items(url: str, strategy: str, items: list, max_tokens: int, top_k: int, extra: dict,
              concurrency: int = 1) -> tuple[list[dict], float]:
    """Ask every item (Question or Conflict); returns records in item order and the wall time."""
    import openai
    from tqdm import tqdm

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    label = strategy + (f" a={extra['ckplug_alpha']}" if "ckplug_alpha" in extra else "")
    pool = cf.ThreadPoolExecutor(concurrency)
    try:
        futs = [pool.submit(ask, client, strategy, it.question, max_tokens, top_k, extra) for it in items]
        recs = [f.result() for f in tqdm(futs, desc=f"{label} (c={concurrency})", unit="q")]
    except BaseException:  # Ctrl-C: ask nothing more (a with-block would wait for every queued question)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    wall = time.perf_counter() - t0
    for it, rec in zip(items, recs):
        rec["id"] = it.id
        rec["question"] = it.question
    return recs, wall


# ---- scoring -----------------------------------------------------------------------------
def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def summarise(recs: list[dict], wall: float, items: list, kind: str) -> dict:
    ok = [r for r in recs if r["error"] is None]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok]
    decode = [(r["completion_tokens"] - 1) / (r["latency_s"] - r["ttft_s"]) for r in ok
              if r.get("completion_tokens") and r["completion_tokens"] > 1 and r["latency_s"] > r["ttft_s"]]
    s = {"n": len(recs), "failures": len(recs) - len(ok),
         "latency_p50_s": M.percentile(lat, 50), "latency_p95_s": M.percentile(lat, 95),
         "ttft_p50_s": M.percentile(ttft, 50), "ttft_p95_s": M.percentile(ttft, 95),
         "decode_tokens_per_s_p50": M.percentile(decode, 50),
         "aggregate_tokens_per_s": sum(r.get("completion_tokens") or 0 for r in ok) / wall if wall else None,
         "prompt_tokens_mean": _mean([r.get("prompt_tokens") for r in ok]),
         "completion_tokens_mean": _mean([r.get("completion_tokens") for r in ok]),
         "server_ms_mean": {k: _mean([r["server_timings_ms"].get(k) for r in ok])
                            for k in ("retrieve", "queue", "prefill", "decode", "ttft", "total")},
         # what answered: for `auto` (and experiments) the strategies the router chose
         "routed": dict(collections.Counter(r.get("routed") for r in ok if r.get("routed")).most_common())}
    by_id = {it.id: it for it in items}
    if kind == "questions":
        for r in recs:
            q: Question = by_id[r["id"]]
            r.update(em=M.exact_match(r["output"], q.answers), f1=M.f1(r["output"], q.answers),
                     contains=M.contains(r["output"], q.answers), recall_at_k=M.recall_at_k(r.get("retrieved", []),
                                                                                        q.gold_doc_ids))
        # failures score zero: they are part of the answer quality a user would see
        s.update(em=_mean([r["em"] for r in recs]), f1=_mean([r["f1"] for r in recs]),
                 contains=_mean([r["contains"] for r in recs]), recall_at_k=_mean([r["recall_at_k"] for r in recs]))
    else:
        triples = []
        for r in recs:
            c: Conflict = by_id[r["id"]]
            r.update(has_memory=M.contains(r["output"], c.memory_answers),
                     has_context=M.contains(r["output"], c.context_answers),
                     context_retrieved=(c.doc_id in r.get("retrieved", [])) if c.context else None)
            triples.append((r["output"], c.memory_answers, c.context_answers))
        s.update(M.conflict_scores(triples))
        s["context_retrieved"] = _mean([float(r["context_retrieved"]) for r in recs
                                        if r.get("context_retrieved") is not None])
    return s


# ---- report -------------------------------------------------------------------------------
def _fmt(v, pct=False, digits=2):
    if v is None:
        return "n/a"
    return f"{100 * v:.1f}%" if pct else f"{v:.{digits}f}"


def _table(header: list[str], rows: list[list]) -> list[str]:
    """Markdown table lines, then a blank line."""
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(str(x) for x in row) + " |" for row in rows] + [""])


def report_md(result: dict) -> str:
    lines = [f"# knowmux bench: {result['dataset']}", "", f"`{result['command']}`", "",
             f"Model {result['model']}, commit {result['git_commit']}, {result['machine']}; "
             f"build (ingest) {result['build']['ingest_s']:.1f} s for {result['build']['documents']} documents "
             f"({result['build']['ingest_s_per_doc'] * 1e3:.0f} ms each)."]
    for kind, label in (("kv", "KV caches"), ("adapters", "Adapters")):
        if kind in result["build"]:
            b = result["build"][kind]
            spd = b["seconds_per_built_doc"]
            lines.append(f"{label}: {b['documents']} retrievable documents, {b['built']} built, "
                         f"{b['already_stored']} already stored, {b['wall_s']:.1f} s"
                         + (f" ({spd:.2f} s per built document)." if spd else "."))
    lines.append("")
    q = [r for r in result["runs"] if r["kind"] == "questions"]
    if q:
        lines += _table(["strategy", "n", "EM", "F1", "contains", "recall@k", "TTFT p50", "latency p50", "p95",
                         "decode tok/s", "prompt tok", "failures"],
                        [[r["label"], r["n"], _fmt(r["em"], True), _fmt(r["f1"], True), _fmt(r["contains"], True),
                          _fmt(r["recall_at_k"], True), f"{_fmt(r['ttft_p50_s'])} s", f"{_fmt(r['latency_p50_s'])} s",
                          f"{_fmt(r['latency_p95_s'])} s", _fmt(r["decode_tokens_per_s_p50"], digits=1),
                          _fmt(r["prompt_tokens_mean"], digits=0), r["failures"]] for r in q])
    c = [r for r in result["runs"] if r["kind"] == "conflicts"]
    if c:
        lines += _table(["strategy", "n", "memory recall MR", "po/N", "context recall ps/N", "context retrieved",
                         "latency p50", "failures"],
                        [[r["label"], r["n"], _fmt(r["memory_recall"], True), _fmt(r["memory_rate"], True),
                          _fmt(r["context_recall"], True), _fmt(r["context_retrieved"], True),
                          f"{_fmt(r['latency_p50_s'])} s", r["failures"]] for r in c])
    conc = [r for r in result["runs"] if r.get("concurrency", 1) > 1]
    if conc:
        lines += ["Concurrency (same run): aggregate completion tokens/s", "",
                  "| strategy | clients | tokens/s | single-client tokens/s |", "|---|---|---|---|"]
        for r in conc:
            lines.append(f"| {r['label']} | {r['concurrency']} | {_fmt(r['aggregate_tokens_per_s'], digits=1)} | "
                         f"{_fmt(r['single_client_tokens_per_s'], digits=1)} |")
        lines.append("")
    if result["unavailable"]:
        lines += [f"Unavailable on this server (not run): {', '.join(result['unavailable'])}", ""]
    return "\n".join(lines)


def plots(result: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    q = [r for r in result["runs"] if r["kind"] == "questions" and r.get("concurrency", 1) == 1
         and r["latency_p50_s"] is not None]
    if q:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in q:
            ax.scatter(r["latency_p50_s"], 100 * (r["contains"] or 0))
            ax.annotate(r["label"], (r["latency_p50_s"], 100 * (r["contains"] or 0)), fontsize=8)
        ax.set_xlabel("median latency (s)")
        ax.set_ylabel("answer contained (%)")
        ax.set_title(f"{result['dataset']}: accuracy vs latency")
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_latency.png", dpi=110)
        plt.close(fig)
        made.append("accuracy_vs_latency.png")
    c = [r for r in result["runs"] if r["kind"] == "conflicts" and r.get("concurrency", 1) == 1]
    sweeps: dict[str, list] = {}
    for r in c:
        if r.get("alpha") not in (None, "adaptive"):
            sweeps.setdefault(r["strategy"], []).append(r)
    if sweeps:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rs in sweeps.items():
            rs.sort(key=lambda r: r["alpha"])
            mr = [(r["alpha"], 100 * r["memory_recall"]) for r in rs if r["memory_recall"] is not None]
            if mr:
                ax.plot([p[0] for p in mr], [p[1] for p in mr], marker="o", label=f"{name}: MR")
            ax.plot([r["alpha"] for r in rs], [100 * (r["context_recall"] or 0) for r in rs], marker="x",
                    linestyle=":", label=f"{name}: context recall ps/N")
        for r in c:  # references: plain strategies and the adaptive setting
            if r.get("alpha") in (None, "adaptive") and r["memory_recall"] is not None:
                ax.axhline(100 * r["memory_recall"], linestyle="--", linewidth=1, label=f"{r['label']}: MR",
                           color="gray" if r.get("alpha") is None else "tab:red")
        ax.set_xlabel("ckplug_alpha (0 trusts context, 1 trusts memory)")
        ax.set_ylabel("%")
        ax.set_title(f"{result['dataset']}: memory recall vs alpha")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "memory_recall_vs_alpha.png", dpi=110)
        plt.close(fig)
        made.append("memory_recall_vs_alpha.png")
    return made


# ---- main ---------------------------------------------------------------------------------
def parse_args(argv):
    ap = argparse.ArgumentParser(prog="knowmux bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", help="a data set under --data-root, or nq_open_sample (bundled)")
    ap.add_argument("--data-root", default=os.environ.get("KNOWMUX_DATA_ROOT", "../shared/data"))
    ap.add_argument("--corpus", type=Path)
    ap.add_argument("--questions", type=Path)
    ap.add_argument("--conflicts", type=Path)
    ap.add_argument("--distractors", choices=sorted(DISTRACTORS))
    ap.add_argument("--n", type=int, help="first N questions/conflicts (default all)")
    ap.add_argument("--skip", type=int, default=0,
                    help="leave out the first SKIP questions/conflicts (e.g. those a router was trained on)")
    ap.add_argument("--strategies", default="direct,rag")
    ap.add_argument("--alphas", default=DEFAULT_ALPHAS,
                    help="ckplug_alpha values swept for +ckplug strategies on conflict sets")
    ap.add_argument("--question-alphas", default="adaptive",
                    help="ckplug_alpha values for +ckplug strategies on question sets (default: adaptive only)")
    ap.add_argument("--ckplug-condition", choices=["paper", "code"], default="paper",
                    help="when CK-PLUG reweights: the paper's CG < epsilon |H(with context)|, or the released "
                         "code's CG < H(with context)")
    ap.add_argument("--ckplug-epsilon", type=float, help="the paper condition's epsilon (<= 0; server default 0)")
    ap.add_argument("--ckplug-variant", choices=["paper", "kept-set"],
                    help="CK-PLUG's equations: the paper's (server default) or knowmux's first, kept-set variant")
    ap.add_argument("--kv-recompute", type=float, help="CacheBlend recompute fraction sent with kv requests")
    ap.add_argument("--kv-link-tokens", type=int,
                    help="LegoLink: first tokens of each non-first passage recomputed, sent with kv requests")
    ap.add_argument("--kv-variant", action="append", default=[], type=_kv_variant, metavar="OPT=V[,OPT=V]",
                    help="one more kv run with these request options (repeatable; in the same run, on the same "
                         "questions), e.g. kv_link_tokens=4 or kv_positions=parallel,kv_temperature=0.5")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--conflict-top-k", type=int, default=1, help="top_k for conflict sets (their own passage)")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=1)
    ap.add_argument("--url", help="a running knowmux server; default: start one on loopback")
    ap.add_argument("--data-dir", type=Path, help="the started server's data dir, kept and reused between runs")
    ap.add_argument("--model", help="model folder for the started server")
    ap.add_argument("--engine", choices=["torch", "vllm"], help="the started server's --engine (default torch)")
    ap.add_argument("--device", help="the started server's --device (auto, cpu, cuda, cuda:N)")
    ap.add_argument("--dtype", help="the started server's --dtype (auto, float32, bfloat16, float16)")
    ap.add_argument("--out", type=Path, required=True)
    return ap.parse_args(argv)


def load_dataset(a) -> Dataset:
    if a.dataset and (a.corpus or a.questions or a.conflicts):
        raise BenchError("give --dataset or --corpus/--questions/--conflicts, not both")
    if a.dataset:
        ds = load(a.dataset, Path(a.data_root))
    elif a.questions or a.conflicts:
        ds = load_generic(a.corpus, a.questions, a.conflicts)
    else:
        raise BenchError("nothing to run: give --dataset, or --questions and/or --conflicts")
    if a.skip:
        ds.questions, ds.conflicts = ds.questions[a.skip:], ds.conflicts[a.skip:]
    if a.n:
        ds.questions, ds.conflicts = ds.questions[:a.n], ds.conflicts[:a.n]
    if a.distractors:
        ds.corpus += DISTRACTORS[a.distractors](Path(a.data_root))
    return ds


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        return _main(a, argv)
    except (BenchError, DatasetError) as e:
        print(f"knowmux bench: {e}", file=sys.stderr)
        return 2


def _main(a, argv) -> int:
    ds = load_dataset(a)
    strategies = [s.strip() for s in a.strategies.split(",") if s.strip()]
    alphas = {"conflicts": _alphas(a.alphas), "questions": _alphas(a.question_alphas)}
    a.out.mkdir(parents=True, exist_ok=True)
    server = None
    if a.url:
        url = a.url.rstrip("/")
    else:
        data_dir = a.data_dir or Path(tempfile.mkdtemp(prefix="knowmux-bench-"))
        extra = [*(["--engine", a.engine] if a.engine else []), *(["--device", a.device] if a.device else []),
                 *(["--dtype", a.dtype] if a.dtype else [])]
        server = Server(data_dir, a.model, a.out / "server.log", extra)
        url = server.url
    try:
        if server:
            server.wait()
        info = server_info(url)
        known = set(info.get("strategies", []))
        unavailable = [s for s in strategies if s not in known]
        runnable = [s for s in strategies if s in known]
        docs = ds.corpus + [{"id": c.doc_id, "title": "", "text": c.context} for c in ds.conflicts if c.context]
        ingest_s = ingest(url, docs) if docs else 0.0
        builds = {}
        kinds = [kind for kind, bases in (("kv", ("kv",)), ("adapters", ("prag",)))
                 if any(st.split("+")[0] in bases for st in runnable)]
        if kinds:
            targets = retrievable(url, [q.question for q in ds.questions], a.top_k)
            targets += [d for d in retrievable(url, [c.question for c in ds.conflicts], a.conflict_top_k)
                        if d not in targets]
            for kind in kinds:
                job = build(url, kind, targets)
                builds[kind] = {"documents": len(targets), "built": job["built"], "already_stored": job["skipped"],
                                "wall_s": job["wall_s"], "seconds_per_built_doc": job["seconds_per_built_doc"]}
        runs, records = [], []
        for strategy in runnable:
            for kind, items, top_k in (("questions", ds.questions, a.top_k),
                                       ("conflicts", ds.conflicts, a.conflict_top_k)):
                if not items:
                    continue
                sweep = alphas[kind] if strategy.endswith("+ckplug") else [None]
                variants = [{}] + (a.kv_variant if strategy == "kv" else [])
                for alpha, variant in [(al, v) for al in sweep for v in variants]:
                    extra = ({"ckplug_alpha": alpha, "ckplug_condition": a.ckplug_condition}
                             if alpha is not None else {})
                    if alpha is not None:  # sent only when given: the server's defaults otherwise
                        extra.update({k: v for k, v in (("ckplug_epsilon", a.ckplug_epsilon),
                                                        ("ckplug_variant", a.ckplug_variant)) if v is not None})
                    if strategy.split("+")[0] in ("kv", "prag"):
                        extra["on_missing"] = "error"  # a missing artefact is a failure, never a silent fallback
                    if strategy.split("+")[0] == "kv":
                        extra.update({k: v for k, v in (("kv_recompute", a.kv_recompute),
                                                        ("kv_link_tokens", a.kv_link_tokens)) if v is not None})
                        extra.update(variant)
                    recs, wall = run_items(url, strategy, items, a.max_tokens, top_k, extra)
                    s = summarise(recs, wall, items, kind)
                    label = strategy + (f" (alpha={alpha})" if alpha is not None else "") + (
                        f" (recompute={a.kv_recompute})" if "kv_recompute" in extra and "kv_recompute" not in variant
                        else "") + (
                        f" (link={a.kv_link_tokens})" if "kv_link_tokens" in extra and "kv_link_tokens" not in variant
                        else "") + (
                        " [" + ",".join(f"{k}={v}" for k, v in variant.items()) + "]" if variant else "")
                    runs.append({"strategy": strategy, "alpha": alpha, "label": label, "kind": kind,
                                 "concurrency": 1, **s})
                    records += [{**r, "kind": kind, "label": label} for r in recs]
                    if a.concurrency > 1 and kind == "questions" and alpha in (None, "adaptive"):
                        crecs, cwall = run_items(url, strategy, items, a.max_tokens, top_k, extra, a.concurrency)
                        cs = summarise(crecs, cwall, items, kind)
                        runs.append({"strategy": strategy, "alpha": alpha, "label": label, "kind": kind,
                                     "concurrency": a.concurrency, "single_client_tokens_per_s":
                                     s["aggregate_tokens_per_s"], **cs})
        result = {
            "dataset": ds.name, "licence": ds.licence,
            "command": "knowmux bench " + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:])),
            "git_commit": _git_commit(), "model": info.get("root"), "engine": info.get("engine"),
            "device": info.get("device"), "dtype": info.get("dtype"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}",
            "when": time.strftime("%Y-%m-%d %H:%M:%S"), "url": url, "unavailable": unavailable,
            "data_dir": str(data_dir) if server else None,
            "settings": {"skip": a.skip, "top_k": a.top_k, "ckplug_condition": a.ckplug_condition,
                         "ckplug_epsilon": a.ckplug_epsilon, "ckplug_variant": a.ckplug_variant, "kv_recompute": a.kv_recompute, "kv_link_tokens": a.kv_link_tokens, "kv_variants": a.kv_variant, "conflict_top_k": a.conflict_top_k, "max_tokens": a.max_tokens,
                         "n_questions": len(ds.questions), "n_conflicts": len(ds.conflicts)},
            "build": {"documents": len(docs), "ingest_s": ingest_s,
                      "ingest_s_per_doc": ingest_s / len(docs) if docs else 0.0, **builds},
            "runs": runs}
        (a.out / "results.json").write_text(json.dumps(result, indent=1, default=str))
        with open(a.out / "results.jsonl", "w", encoding="utf-8") as f:
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        (a.out / "report.md").write_text(report_md(result))
        result["plots"] = plots(result, a.out)
        print(report_md(result))
        return 0
    finally:
        if server:
            server.stop()


def _kv_variant(text: str) -> dict:
    """"kv_link_tokens=4,kv_positions=parallel" -> {"kv_link_tokens": 4, "kv_positions": "parallel"}
    (numbers as numbers, true/false as booleans; the server checks names and ranges)."""
    out = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise argparse.ArgumentTypeError(f"expected OPT=VALUE[,OPT=VALUE], got {text!r}")
        if value.strip().lower() in ("true", "false"):
            out[name.strip()] = value.strip().lower() == "true"
            continue
        for cast in (int, float, str):
            try:
                out[name.strip()] = cast(value.strip())
                break
            except ValueError:
                continue
    return out


def _alphas(text: str) -> list:
    try:
        return [x if x == "adaptive" else float(x) for x in text.split(",") if x]
    except ValueError:
        raise BenchError(f"alphas must be numbers in [0, 1] or 'adaptive': {text!r}") from None


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
