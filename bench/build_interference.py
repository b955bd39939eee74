"""How much does a build (adapters, or KV caches) slow down live serving? Measured side by side.

    python -m bench.build_interference       # -> bench/results/build_interference.json

One `knowmux serve` with the bundled NQ sample. The same load (C clients at once, one
`direct` request each, greedy, ignore_eos, --max-tokens) runs twice on fresh questions:
first with the server idle, then while a build job trains adapters for --docs documents
(each optimiser step runs on the engine thread between serving steps), or with --kind kv
builds the KV caches of --docs documents (one passage prefill per call). Reports
aggregate tokens/s, TTFT and latency for both, and the build's own progress meanwhile.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench import load
from bench.run import SAMPLE_CORPUS, Server, ingest_sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="default: a fresh temporary folder (a reused one may resume an old build)")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--requests", type=int, default=6, help="per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--kind", choices=["adapters", "kv"], default="adapters")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--out", default="bench/results/build_interference.json")
    a = ap.parse_args(argv)
    a.data_dir = a.data_dir or tempfile.mkdtemp(prefix="knowmux-interference-")
    ingest_sample(a.data_dir)
    server = Server(Path(a.data_dir), None, Path(a.data_dir) / "server.log")
    url = server.url
    n = a.clients * a.requests
    try:
        server.wait()
        idle = load.main_levels(url, "knowmux", [a.clients], a.requests, "direct", a.max_tokens, None, offset=1)[0]
        ids = [json.loads(line)["id"] for line in open(SAMPLE_CORPUS)][-a.docs:]
        job = httpx.post(url + "/v1/builds", json={"kind": a.kind, "doc_ids": ids}, timeout=60).json()
        time.sleep(2)  # let the build get past its first document's setup
        progress = {}

        def watch():
            while True:
                try:
                    v = httpx.get(f"{url}/v1/jobs/{job['id']}", timeout=30).json()
                except httpx.HTTPError:  # the server is being stopped
                    return
                progress.update(v)
                if v["status"] in ("done", "failed"):
                    return
                time.sleep(0.5)

        threading.Thread(target=watch, daemon=True).start()
        done_before = progress.get("done", 0)
        busy = load.main_levels(url, "knowmux", [a.clients], a.requests, "direct", a.max_tokens, None,
                                offset=1 + n)[0]
        done_during = progress.get("done", 0) - done_before
        busy_status = progress.get("status")
    finally:
        server.stop()
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": "python -m bench.build_interference " + " ".join(sys.argv[1:] if argv is None else argv),
              "kind": a.kind, "docs": a.docs, "clients": a.clients, "requests_per_client": a.requests, "max_tokens": a.max_tokens,
              "idle": idle, "during_build": busy, "build_docs_finished_during_load": done_during,
              "build_status_at_end": busy_status,
              "slowdown_tokens_per_s": idle["tokens_per_s"] / busy["tokens_per_s"]}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("idle", "during_build")}, indent=1))
    for name in ("idle", "during_build"):
        r = report[name]
        print(f"{name:13} {r['tokens_per_s']:6.1f} tok/s  ttft p50 {r['ttft_p50_s']:.2f}s p95 {r['ttft_p95_s']:.2f}s  "
              f"latency p50 {r['latency_p50_s']:.2f}s p95 {r['latency_p95_s']:.2f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
