"""Per-strategy scores of a bench run on a range of its questions (e.g. the ones a router
was not trained on), from the run's per-question records.

    python -m bench.subset runs/nq-200/results.jsonl --start 56 --stop 200

Questions are counted in the run's order, from 0, per strategy. Prints n, answer
containment, token F1, exact match (failures score zero, as in the run's report), median
latency and time to first token of the answered ones, and for ``auto`` where the router
sent the questions.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter, defaultdict
from pathlib import Path

from bench.metrics import percentile


def subset(records: list[dict], start: int, stop: int) -> dict:
    by = defaultdict(list)
    for r in records:
        by[r["strategy"]].append(r)
    out = {}
    for s, rs in by.items():
        rs = rs[start:stop]
        if not rs:
            continue
        ok = [r for r in rs if r.get("error") is None]
        # as the bench's own report: failures score zero, times are of the answered ones
        out[s] = {"n": len(rs), "failures": len(rs) - len(ok),
                  **{m: statistics.mean(float(r.get(m) or 0.0) for r in rs) for m in ("contains", "f1", "em")},
                  "latency_p50_s": percentile([r["latency_s"] for r in ok], 50),
                  "ttft_p50_s": percentile([r["ttft_s"] for r in ok], 50),
                  "routed": dict(Counter(r["routed"] for r in ok if r.get("routed")))}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", type=Path, help="a bench run's results.jsonl")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--stop", type=int)
    a = ap.parse_args(argv)
    records = [json.loads(line) for line in a.results.read_text(encoding="utf-8").splitlines() if line.strip()]
    print("| strategy | n | failures | contains | F1 | EM | latency p50 | TTFT p50 | routed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s, v in subset(records, a.start, a.stop).items():
        routed = ", ".join(f"{k} {n}" for k, n in v["routed"].items()) if s == "auto" else ""
        print(f"| {s} | {v['n']} | {v['failures']} | {v['contains']:.1%} | {v['f1']:.1%} | {v['em']:.1%} | "
              f"{v['latency_p50_s']:.2f} s | {v['ttft_p50_s']:.2f} s | {routed} |")


if __name__ == "__main__":
    main()
