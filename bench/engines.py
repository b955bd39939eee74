"""The torch engine against the vllm engine, both inside knowmux, same model, same questions.

    python -m bench.engines            # -> bench/results/engines.json

For `rag` (top-3) and `prag` (top-1: the retrieved document's adapter), at concurrency 1
(3 requests one after another) and 8 (8 clients at once, one request each): time to first
token, decode tokens/s per request and aggregate completion tokens/s. Greedy, ignore_eos,
--max-tokens tokens. The adapters of every document the questions retrieve are trained
first by the torch engine (not timed); then `knowmux serve --engine torch` and
`knowmux serve --engine vllm` run one after the other on the same data dir.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench import load
from bench.run import Server, build, ingest_sample, retrievable

C1_REQUESTS, C8 = 3, 8


def measure(url: str, max_tokens: int) -> dict:
    out = {}
    for strategy, top_k in (("rag", 3), ("prag", 1)):
        c1 = load.main_levels(url, "knowmux", [1], C1_REQUESTS, strategy, max_tokens, None, top_k, offset=1)[0]
        c8 = load.main_levels(url, "knowmux", [C8], 1, strategy, max_tokens, None, top_k, offset=1 + C1_REQUESTS)[0]
        for r in (c1, c8):  # per-request decode rate: the tokens after the first over the time after it
            r["decode_tokens_per_s"] = (max_tokens - 1) / max(r["latency_p50_s"] - r["ttft_p50_s"], 1e-9)
        out[strategy] = {"c1": c1, "c8": c8}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", default="runs/engines-data")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/engines.json")
    a = ap.parse_args(argv)
    ingest_sample(a.data_dir)
    results, build_info = {}, None
    for engine in ("torch", "vllm"):
        server = Server(Path(a.data_dir), None, Path(tempfile.gettempdir()) / f"knowmux-engines-{engine}.log",
                        ["--engine", engine])
        try:
            server.wait()
            if engine == "torch":  # adapters of what the questions retrieve (top-1), trained once
                questions = ["warm up"] + load.load_questions(C1_REQUESTS + C8, 1)
                targets = retrievable(server.url, questions, 1)
                t0 = time.time()
                job = build(server.url, "adapters", targets)
                build_info = {"documents": len(targets), "built": job["built"], "wall_s": round(time.time() - t0, 1)}
                print(f"adapters: {build_info}", flush=True)
            results[engine] = measure(server.url, a.max_tokens)
        finally:
            server.stop()
    report = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "max_tokens": a.max_tokens, "build": build_info,
              "command": "python -m bench.engines " + " ".join(sys.argv[1:] if argv is None else argv),
              "results": results}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=1))
    print("| strategy | C | engine | TTFT p50 | decode tok/s (per request) | aggregate tok/s |")
    print("|---|---|---|---|---|---|")
    for strategy in ("rag", "prag"):
        for c in ("c1", "c8"):
            for engine in results:
                r = results[engine][strategy][c]
                print(f"| {strategy} | {c[1:]} | {engine} | {r['ttft_p50_s']:.2f} s | {r['decode_tokens_per_s']:.1f} | "
                      f"{r['tokens_per_s']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
