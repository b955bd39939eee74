"""Do two benchmark runs give the same answers? (dtypes, engines, devices: same questions.)

    python -m bench.agreement runs/nq-fp32 runs/nq-bf16 [--out bench/results/agreement.json]

Reads each run's results.jsonl (``knowmux bench --out``) and, per run label (strategy, alpha), counts the
questions whose answers are identical (after stripping whitespace) in both, and each
run's containment accuracy on them. Greedy runs only make the comparison meaningful.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path


def load(run: Path) -> dict:
    out = {}
    with open(run / "results.jsonl", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            if r.get("kind") == "questions":
                out[(r["label"], r["id"])] = r
    return out


def compare(a: dict, b: dict) -> dict:
    per = defaultdict(lambda: {"n": 0, "same": 0, "contains_a": 0, "contains_b": 0})
    for key in sorted(set(a) & set(b)):
        s = per[key[0]]
        s["n"] += 1
        s["same"] += a[key]["output"].strip() == b[key]["output"].strip()
        s["contains_a"] += bool(a[key].get("contains"))
        s["contains_b"] += bool(b[key].get("contains"))
    return {k: {**v, "agreement": v["same"] / v["n"]} for k, v in per.items()}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    res = compare(load(args.a), load(args.b))
    meta = [json.loads((r / "results.json").read_text()) for r in (args.a, args.b)]
    print(f"a: {args.a} ({meta[0].get('dtype')}, {meta[0].get('device')}); "
          f"b: {args.b} ({meta[1].get('dtype')}, {meta[1].get('device')})")
    print(f"{'strategy':<12} {'n':>4} {'same answer':>12} {'contains a':>11} {'contains b':>11}")
    for k, v in res.items():
        print(f"{k:<12} {v['n']:>4} {v['agreement']:>11.1%} {v['contains_a'] / v['n']:>10.1%} "
              f"{v['contains_b'] / v['n']:>10.1%}")
    if args.out:
        args.out.write_text(json.dumps({"a": str(args.a), "b": str(args.b),
                                        "a_run": {k: meta[0].get(k) for k in ("command", "dtype", "device", "when")},
                                        "b_run": {k: meta[1].get(k) for k in ("command", "dtype", "device", "when")},
                                        "strategies": res}, indent=2))


if __name__ == "__main__":
    main()
