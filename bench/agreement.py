"""Do two benchmark runs give the same answers? (dtypes, engines, devices: same questions.)

    python -m bench.agreement runs/nq-fp32 runs/nq-bf16 [--out bench/results/agreement.json]
    python -m bench.agreement runs/nq-k1 runs/nq-k1 --pair kv:rag   # two strategies of one run

Reads each run's results.jsonl (``knowmux bench --out``) and, per run label (strategy, alpha), counts the
questions whose answers are identical (after stripping whitespace) in both, those whose
first 8 words are, those both runs judge alike (gold answer contained in both or
neither; for conflict sets such as RGB, the memory and the context answer alike), and each
run's containment accuracy on them (conflicts: the memory answer). Greedy runs only make the comparison meaningful.
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
            if r.get("kind") in ("questions", "conflicts"):  # ids differ between the two kinds
                out[(r["label"], r["id"])] = r
    return out


def compare(a: dict, b: dict, words: int = 8) -> dict:
    """Per label: identical answers, answers whose first ``words`` words are identical, and
    questions both runs judge alike (the gold answer contained in both or in neither)."""
    per = defaultdict(lambda: {"n": 0, "same": 0, "same_start": 0, "same_verdict": 0, "contains_a": 0,
                               "contains_b": 0})
    for key in sorted(set(a) & set(b)):
        s = per[key[0]]
        x, y = a[key]["output"].strip(), b[key]["output"].strip()
        s["n"] += 1
        s["same"] += x == y
        s["same_start"] += x.split()[:words] == y.split()[:words]
        s["contains_a"] += bool(_right(a[key]))
        s["contains_b"] += bool(_right(b[key]))
        s["same_verdict"] += _verdict(a[key]) == _verdict(b[key])
    return {k: {**v, "agreement": v["same"] / v["n"]} for k, v in per.items()}


def _right(r: dict) -> bool:
    """A question's gold answer contained; a conflict's memory (true) answer contained."""
    return bool(r.get("contains") if "contains" in r else r.get("has_memory"))


def _verdict(r: dict):
    """What the scorer says of an answer: contained or not (questions); which of the memory
    and the context answers it contains (conflicts)."""
    return bool(r.get("contains")) if "contains" in r else (bool(r.get("has_memory")), bool(r.get("has_context")))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("a", type=Path)
    ap.add_argument("b", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--pair", help="A:B compares label A of the first run with label B of the second (e.g. kv:rag)")
    args = ap.parse_args(argv)
    a, b = load(args.a), load(args.b)
    if args.pair:
        la, _, lb = args.pair.partition(":")
        a = {k: v for k, v in a.items() if k[0] == la}
        b = {(f"{la} vs {lb}", k[1]): v for k, v in b.items() if k[0] == lb}
        a = {(f"{la} vs {lb}", k[1]): v for k, v in a.items()}
    res = compare(a, b)
    meta = [json.loads((r / "results.json").read_text()) for r in (args.a, args.b)]
    print(f"a: {args.a} ({meta[0].get('dtype')}, {meta[0].get('device')}); "
          f"b: {args.b} ({meta[1].get('dtype')}, {meta[1].get('device')})")
    print(f"{'strategy':<12} {'n':>4} {'same answer':>12} {'same 8 words':>13} {'same verdict':>13} "
          f"{'contains a':>11} {'contains b':>11}")
    for k, v in res.items():
        n = v["n"]
        print(f"{k:<12} {n:>4} {v['agreement']:>11.1%} {v['same_start'] / n:>12.1%} {v['same_verdict'] / n:>12.1%} "
              f"{v['contains_a'] / n:>10.1%} {v['contains_b'] / n:>10.1%}")
    if args.out:
        args.out.write_text(json.dumps({"a": str(args.a), "b": str(args.b),
                                        "a_run": {k: meta[0].get(k) for k in ("command", "dtype", "device", "when")},
                                        "b_run": {k: meta[1].get(k) for k in ("command", "dtype", "device", "when")},
                                        "strategies": res}, indent=2))


if __name__ == "__main__":
    main()
