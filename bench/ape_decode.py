"""Decode speed of `kv` rows under APE's attention (T != 1) against plain attention, in one run.

    python -m bench.ape_decode [--rows 1,4] [--context 600] [--steps 48] [--out bench/results/ape_decode.json]

SmolLM2 (the served model folder), fp32, the runner's forward alone (no server): rows whose
caches hold a head of 30 tokens and --context tokens of passages, decoding --steps tokens:

- `plain`: T = 1, the pooled decode call (scaled_dot_product_attention), what `rag` rows get;
- `ape-pooled`: T = 0.8 (the default with two passages or more) in the same pooled call;
- `ape-per-row`: T = 0.8, each row attending alone (server.engine.ape.attend: what every APE
  row did before 2026-12-07), measured by giving the rows private caches.

The three alternate step by step (ABCABC...) so drift on a shared machine hits all alike;
reports median ms per decode step and tokens/s per row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,4")
    ap.add_argument("--context", type=int, default=600)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--out", type=Path, default=Path("bench/results/ape_decode.json"))
    a = ap.parse_args(argv)
    from server.engine.ape import ParallelContext
    from server.engine.model import LlamaRunner, Segment
    from server.engine.torch_engine import TorchEngine
    from server.modelfiles import resolve_model

    engine = TorchEngine.from_folder(resolve_model(None))
    runner: LlamaRunner = engine.runner  # not started: default GEMM kernels, the same for all three
    head, n_ctx = 30, a.context
    prompt = torch.randint(100, 20000, (head + n_ctx + 12,), generator=torch.Generator().manual_seed(0))
    result = {"command": "python -m bench.ape_decode " + " ".join(argv or []), "context_tokens": n_ctx, "rows": {}}
    for rows in [int(r) for r in a.rows.split(",")]:
        pool = runner.new_pool(slots=rows, row_tokens=head + n_ctx + 12 + a.steps + 4)
        setups = {}
        for name, pooled, temp in (("plain", True, 1.0), ("ape-pooled", True, 0.8), ("ape-per-row", False, 0.8)):
            caches = []
            for _ in range(rows):
                c = pool.acquire(len(prompt) + a.steps + 2) if pooled else runner.new_cache(len(prompt) + a.steps + 2)
                runner.forward(prompt, [Segment(c, 0, len(prompt))])
                c.parallel = ParallelContext(head, head + n_ctx, temp, 1.0)
                caches.append(c)
            setups[name] = caches
            if pooled:  # the next setup needs the pool's slots: keep this one's caches, measure with its own pool
                pool = runner.new_pool(slots=rows, row_tokens=head + n_ctx + 12 + a.steps + 4)
        times = {name: [] for name in setups}
        for _ in range(a.steps):
            for name, caches in setups.items():
                ids = torch.full((rows,), 42)
                t0 = time.perf_counter()
                runner.forward(ids, [Segment(c, i, 1, want_logits=True) for i, c in enumerate(caches)])
                times[name].append(time.perf_counter() - t0)
        out = {}
        for name, ts in times.items():
            ms = statistics.median(ts[4:]) * 1e3  # the first steps warm the kernels
            out[name] = {"ms_per_step": round(ms, 2), "tokens_per_s_per_row": round(1e3 / ms, 1)}
        out["ape_pooled_over_per_row_speed"] = round(out["ape-per-row"]["ms_per_step"] / out["ape-pooled"]["ms_per_step"], 3)
        out["ape_pooled_over_plain_time"] = round(out["ape-pooled"]["ms_per_step"] / out["plain"]["ms_per_step"], 3)
        result["rows"][rows] = out
        print(f"{rows} row(s): {json.dumps(out)}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
