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
import resource
import time


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def current_mb() -> float:
    with open("/proc/self/status") as f:  # Linux
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS"))


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
    before = peak_mb()
    t0 = time.perf_counter()
    runner = LlamaRunner(model)
    print(f"runner built in {time.perf_counter() - t0:.2f} s; peak RSS {before:.0f} MB after loading, "
          f"{peak_mb():.0f} MB after building the runner; RSS {current_mb():.0f} MB with the runner built",
          flush=True)
    del runner


if __name__ == "__main__":
    main()
