"""Prompts and timing rules shared by the engine speed benchmark and its vLLM side
(which runs in vLLM's own environment, so this file imports nothing but the stdlib)."""

from __future__ import annotations

import json
import time
from pathlib import Path

CORPUS = Path(__file__).parent / "data" / "nq_open_sample" / "corpus.jsonl"
PREFILL_TOKENS = 512  # the long prompt for prefill speed
DECODE_TOKENS = 128  # generated for decode speed
BATCH = 8  # prompts generated together for batched speed
BATCH_TOKENS = 64


def texts() -> list[str]:
    with open(CORPUS, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def make_prompts(tokenize) -> dict:
    """Token-id prompts every engine gets: one long (prefill), one short (decode), BATCH short ones."""
    t = texts()
    long_ids: list[int] = []
    i = 0
    while len(long_ids) < PREFILL_TOKENS:
        long_ids += tokenize(t[i] + "\n")
        i += 1
    short = [tokenize(f"Question: summarise this passage.\n{t[j][:300]}") for j in range(BATCH + 1)]
    return {"long": long_ids[:PREFILL_TOKENS], "short": short[0], "batch": short[1:]}


def timed(fn, repeat: int = 3) -> float:
    """Best of `repeat` wall times in seconds (the machine is shared; the minimum is the least noisy)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(prompts: dict, run_one, run_batch, repeat: int = 3) -> dict:
    """run_one(ids, n) generates n tokens greedily, ignoring eos, for one prompt;
    run_batch(list_of_ids, n) does it for several prompts at once.
    Decode speed is (n - 1) / (time for n tokens - time for 1 token), on the same prompt."""
    t_prefill = timed(lambda: run_one(prompts["long"], 1), repeat)
    t1 = timed(lambda: run_one(prompts["short"], 1), repeat)
    tn = timed(lambda: run_one(prompts["short"], DECODE_TOKENS), repeat)
    tb = timed(lambda: run_batch(prompts["batch"], BATCH_TOKENS), repeat)
    return {
        "prefill_tokens_per_s": len(prompts["long"]) / t_prefill,
        "decode_tokens_per_s": (DECODE_TOKENS - 1) / (tn - t1),
        "batched_tokens_per_s": BATCH * BATCH_TOKENS / tb,
        "seconds": {"prefill_512": t_prefill, "first_token_short": t1, f"short_{DECODE_TOKENS}": tn,
                    f"batch_{BATCH}x{BATCH_TOKENS}": tb},
    }
