"""Every strategy once on each engine, on this machine's accelerator: time to first token
and decode tokens/s per strategy, printed as a table (bench/gpu_check.sh runs this).

    python -m bench.gpu_check                      # a GPU machine: --device cuda, both engines
    python -m bench.gpu_check --dry-run --model DIR --engines torch   # the CPU rehearsal (tests)

For each engine: start ``knowmux serve --engine E --device D --dtype T`` on a fresh data
folder, add --docs documents of the bundled NQ sample, build their KV caches and adapters
(on either engine; a build the server refuses is reported as refused), then ask
--questions questions per strategy (greedy, --max-tokens tokens, the first answer is a
warm-up and not counted). TTFT and the decode rate come from the server's own timings
(``knowmux.timings_ms``). A strategy the server does not offer is listed as unavailable
with the reason, never silently skipped. Exit status 1 if any request failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.run import SAMPLE_CORPUS, BenchError, Server, server_info

STRATEGIES = ("direct", "rag", "rag+ckplug", "kv", "kv+ckplug", "prag", "prag+rag", "auto")


def gpu_name() -> str:
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception as e:  # a broken CUDA install is worth printing, not dying on
        return f"unknown ({type(e).__name__})"


def wait_job(http, url: str, job: dict, timeout: float) -> dict:
    deadline = time.time() + timeout
    while job["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(0.5)
        job = http.get(f"{url}/v1/jobs/{job['id']}").json()
    return job


def check_engine(engine: str, a, docs: list[dict], questions: list[str]) -> list[dict]:
    import httpx

    rows = []
    with tempfile.TemporaryDirectory(prefix=f"knowmux-gpucheck-{engine}-") as d:
        args = ["--engine", engine, "--device", a.device, "--dtype", a.dtype]
        server = Server(Path(d), a.model, Path(d) / "server.log", args)
        try:
            server.wait(timeout=a.start_timeout)
            info = server_info(server.url)
            offered = set(info.get("strategies", []))
            with httpx.Client(timeout=a.request_timeout) as http:
                builds = [k for k in ("kv", "adapters")
                          if ("kv" in offered if k == "kv" else "prag" in offered)]
                r = http.post(server.url + "/v1/documents", json={"documents": docs})
                r.raise_for_status()
                for kind in builds:
                    r = http.post(server.url + "/v1/builds", json={"kind": kind, "doc_ids": [x["id"] for x in docs]})
                    job = wait_job(http, server.url, r.json(), a.request_timeout) if r.status_code == 200 else \
                        {"status": f"refused: {r.json().get('error', {}).get('message', r.text)[:120]}"}
                    print(f"[{engine}] build {kind}: {job['status']}", flush=True)
                for strategy in STRATEGIES:
                    row = {"engine": engine, "strategy": strategy, "device": info.get("device"),
                           "dtype": info.get("dtype")}
                    if strategy not in offered:
                        row["unavailable"] = f"not offered by the {engine} engine here"
                        rows.append(row)
                        continue
                    ttft, rate, failures, tokens = [], [], [], 0
                    for i, q in enumerate([questions[0]] + questions):  # the first is a warm-up
                        r = http.post(server.url + "/v1/chat/completions", headers={"X-Strategy": strategy},
                                      json={"model": "knowmux", "messages": [{"role": "user", "content": q}],
                                            "max_tokens": a.max_tokens, "temperature": 0, "ignore_eos": True,
                                            "top_k": a.top_k})
                        if r.status_code != 200:
                            failures.append(f"{r.status_code}: {r.text[:160]}")
                            continue
                        if i == 0:
                            continue
                        body = r.json()
                        t = body["knowmux"]["timings_ms"]
                        n = body["usage"]["completion_tokens"]
                        tokens += n
                        ttft.append(t["ttft"])
                        if n > 1 and t["total"] > t["ttft"]:
                            rate.append((n - 1) / ((t["total"] - t["ttft"]) / 1e3))
                    row.update(n=len(ttft), ttft_ms_p50=round(statistics.median(ttft), 1) if ttft else None,
                               decode_tokens_per_s_p50=round(statistics.median(rate), 1) if rate else None,
                               completion_tokens=tokens, failures=failures)
                    rows.append(row)
                    print(f"[{engine}] {strategy}: {row['n']} answers, ttft p50 {row['ttft_ms_p50']} ms, "
                          f"{row['decode_tokens_per_s_p50']} tokens/s" + (f", {len(failures)} failed" if failures else ""),
                          flush=True)
        finally:
            server.stop()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="rehearse on the CPU (--device cpu, 2 documents, 2 questions, 4 tokens)")
    ap.add_argument("--engines", default="torch,vllm")
    ap.add_argument("--model", help="model folder (default: the server's default model)")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--docs", type=int, default=None, help="documents to add and build (default 8; 2 dry)")
    ap.add_argument("--questions", type=int, default=None, help="timed questions per strategy (default 5; 2 dry)")
    ap.add_argument("--max-tokens", type=int, default=None, help="default 64 (4 dry)")
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--start-timeout", type=float, default=900)
    ap.add_argument("--request-timeout", type=float, default=1800)
    ap.add_argument("--out", type=Path, help="write the rows as JSON here too")
    a = ap.parse_args(argv)
    dry = a.dry_run
    a.device = a.device or ("cpu" if dry else "cuda")
    a.docs = a.docs or (2 if dry else 8)
    a.max_tokens = a.max_tokens or (4 if dry else 64)
    n_questions = a.questions or (2 if dry else 5)
    docs = [json.loads(line) for line in SAMPLE_CORPUS.read_text(encoding="utf-8").splitlines()[:a.docs]]
    for x in docs:
        x.setdefault("title", "")
    questions = [f"What does the passage about {x['title'] or x['id']} say?" for x in docs]
    questions = (questions * n_questions)[:n_questions]
    print(f"knowmux gpu check: {platform.node()}, GPU {gpu_name()}, device {a.device}, dtype {a.dtype}, "
          f"engines {a.engines}{' (dry run)' if dry else ''}", flush=True)
    rows = []
    for engine in [e for e in a.engines.split(",") if e]:
        try:
            rows += check_engine(engine, a, docs, questions)
        except BenchError as e:
            rows.append({"engine": engine, "strategy": "*", "unavailable": str(e)})
            print(f"[{engine}] could not start: {e}", flush=True)
    print(f"\n{'engine':<7} {'strategy':<11} {'device':<8} {'dtype':<9} {'ttft p50 ms':>11} {'tokens/s':>9}  note")
    for r in rows:
        note = r.get("unavailable") or (f"{len(r['failures'])} failed: {r['failures'][0]}" if r.get("failures") else "")
        print(f"{r['engine']:<7} {r['strategy']:<11} {str(r.get('device')):<8} {str(r.get('dtype')):<9} "
              f"{str(r.get('ttft_ms_p50', '-')):>11} {str(r.get('decode_tokens_per_s_p50', '-')):>9}  {note}")
    if a.out:
        a.out.write_text(json.dumps({"command": "python -m bench.gpu_check " + " ".join(argv or sys.argv[1:]),
                                     "gpu": gpu_name(), "when": time.strftime("%Y-%m-%d %H:%M:%S"),
                                     "rows": rows}, indent=2))
    return 1 if any(r.get("failures") for r in rows) else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
