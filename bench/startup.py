"""Engine start-up: time and peak memory of building the torch engine's runner.

    python -m bench.startup [--model FOLDER]

Loads the model (transformers, fp32), then builds the ``LlamaRunner`` over it (fused
weights, kernel timing); prints the runner's construction time, the process's peak
resident memory before and after it, and its resident memory once built. Run it for
two checkouts one after the other (``PYTHONPATH=<checkout>``) to compare.
"""

from __future__ import annotations

import argparse
import os
import time

from bench.soak import mem_kib


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: the converted SmolLM2-135M-Instruct)")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM

    from server.engine.model import LlamaRunner
    from server.modelfiles import resolve_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(resolve_model(a.model), dtype=torch.float32).eval()
    before = mem_kib(os.getpid())["VmHWM"] / 1024
    t0 = time.perf_counter()
    runner = LlamaRunner(model)
    dt, mem = time.perf_counter() - t0, mem_kib(os.getpid())
    print(f"runner built in {dt:.2f} s; peak RSS {before:.0f} MB after loading, "
          f"{mem['VmHWM'] / 1024:.0f} MB after building the runner; RSS {mem['VmRSS'] / 1024:.0f} MB with the "
          f"runner built", flush=True)
    del runner


if __name__ == "__main__":
    main()
