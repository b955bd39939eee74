"""The torch engine of two checkouts, A/B/A/B in one run: did a change cost speed?

    git worktree add /tmp/base <commit>
    python -m bench.engine_ab --base /tmp/base [--rounds 3] [--out FILE]

Each round measures this checkout's engine and the base checkout's, in turn (ABBA: the
order flips every round, so neither side always runs first), each in a fresh process
started in its own tree (so each imports its own ``server``), on the
same prompts as ``bench.engine_speed`` (prefill of 512 tokens, decode of 128, 8 prompts
x 64 batched; best of 3 within a run). Prints every run and the ratio this / base per
round, whose median is the figure to quote: alternating keeps the machine's drift out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

KEYS = ("prefill_tokens_per_s", "decode_tokens_per_s", "batched_tokens_per_s")
_ONE = """
import json, os, sys, torch
from transformers import AutoTokenizer
from bench.engine_speed import knowmux_rates
from bench.speed_common import make_prompts
from server.modelfiles import resolve_model
model_dir = str(resolve_model(None))
tok = AutoTokenizer.from_pretrained(model_dir)
torch.set_num_threads(os.cpu_count() or 1)
json.dump(knowmux_rates(model_dir, make_prompts(lambda s: tok.encode(s, add_special_tokens=False))),
          open(sys.argv[1], "w"))
"""


def run_in(tree: Path) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r.json")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(tree)}
        subprocess.run([sys.executable, "-c", _ONE, out], cwd=tree, env=env, check=True)
        return json.load(open(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the other checkout (a git worktree)")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--out", type=Path, default=Path("bench/results/engine_ab.json"))
    a = ap.parse_args()
    here = Path(__file__).resolve().parent.parent
    rounds = []
    for i in range(a.rounds):
        if i % 2 == 0:
            this, base = run_in(here), run_in(a.base.resolve())
        else:
            base, this = run_in(a.base.resolve()), run_in(here)
        ratio = {k: this[k] / base[k] for k in KEYS}
        rounds.append({"this": this, "base": base, "ratio": ratio})
        print(f"round {i + 1}: " + "  ".join(f"{k.split('_')[0]} {this[k]:.1f} vs {base[k]:.1f} ({ratio[k]:.3f}x)"
                                            for k in KEYS), flush=True)
    median = {k: statistics.median(r["ratio"][k] for r in rounds) for k in KEYS}
    print("median this/base: " + "  ".join(f"{k.split('_')[0]} {v:.3f}x" for k, v in median.items()))
    commit = lambda tree: subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree,  # noqa: E731
                                         capture_output=True, text=True).stdout.strip()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"when": time.strftime("%Y-%m-%d %H:%M:%S"), "this": commit(here),
                                 "base": commit(a.base), "rounds": rounds, "median_ratio": median}, indent=1))


if __name__ == "__main__":
    main()
