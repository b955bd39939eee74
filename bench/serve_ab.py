"""Back-to-back A/B of knowmux servers that differ only in their environment.

    python -m bench.serve_ab --variant default --variant old:PYTHONPATH=/path/to/old/checkout \
        --variant passive:OMP_WAIT_POLICY=PASSIVE [--concurrency 8] [--strategy direct]

Each variant is ``NAME`` or ``NAME:KEY=VALUE,KEY=VALUE``: a ``knowmux serve`` is started
with those variables added to the environment (``PYTHONPATH`` pointing at another
checkout serves that checkout's code), loaded with ``bench.load`` at the given
concurrency levels, and stopped before the next starts; one server at a time. Name a
variant twice (A/B/A) to see the drift of the machine within the run.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench import load
from bench.batching import ingest_sample, start_knowmux, stop, wait_ready


def parse_variant(text: str) -> tuple[str, dict]:
    name, _, assignments = text.partition(":")
    env = {}
    for a in filter(None, assignments.split(",")):
        key, sep, value = a.partition("=")
        if not sep or not key:
            raise SystemExit(f"--variant {text!r}: expected NAME or NAME:KEY=VALUE,KEY=VALUE")
        env[key] = value
    return name, env


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variant", action="append", required=True)
    ap.add_argument("--data-dir", default="runs/batching-data")
    ap.add_argument("--strategy", default="direct")
    ap.add_argument("--concurrency", default="8")
    ap.add_argument("--requests", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--port", type=int, default=8131)
    ap.add_argument("--out")
    a = ap.parse_args()
    variants = [parse_variant(v) for v in a.variant]
    levels = [int(x) for x in a.concurrency.split(",")]
    base = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if not (Path(a.data_dir) / "documents.sqlite3").exists():
        ingest_sample(a.data_dir, base)
    url = f"http://127.0.0.1:{a.port}"
    runs = []
    for name, extra in variants:
        proc = start_knowmux(a.data_dir, a.port, {**base, **extra})
        try:
            wait_ready(url, proc)
            rows = load.main_levels(url, "knowmux", levels, a.requests, a.strategy, a.max_tokens, None)
        finally:
            stop(proc)
        runs.append({"variant": name, "env": extra, "rows": rows})
        for r in rows:
            print(f"{name:24s} C={r['concurrency']:<3d} {r['tokens_per_s']:7.1f} tok/s  TTFT p95 "
                  f"{r['ttft_p95_s']:.2f} s  latency p50 {r['latency_p50_s']:.2f} s", flush=True)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "strategy": a.strategy,
                                           "max_tokens": a.max_tokens, "requests_per_client": a.requests,
                                           "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
