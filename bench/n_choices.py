"""Cost of n choices against one: a rag request with n=4 against one with n=1.

    python -m bench.n_choices [http://127.0.0.1:8000]   # a running knowmux server with the NQ sample

Sampled (temperature 1, seed 1), 32 tokens each, eos ignored; n=1 and n=4 alternate over
distinct questions never asked before (so the prefix cache holds none of their prompts).
Prints the medians and their ratio: 4.0 would be four requests' worth of work.
"""

from __future__ import annotations

import statistics
import sys
import time

import httpx

from bench.load import load_questions


def ask(url: str, question: str, n: int) -> float:
    """Wall time of one non-streamed request with ``n`` choices."""
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", timeout=600, json={
        "model": "knowmux", "messages": [{"role": "user", "content": question}], "max_tokens": 32,
        "temperature": 1.0, "seed": 1, "n": n, "strategy": "rag", "ignore_eos": True})
    r.raise_for_status()
    return time.perf_counter() - t0


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    questions = load_questions(17, offset=40)
    ask(url, questions[16], 1)  # warm-up
    one, four = [], []
    for i in range(8):
        one.append(ask(url, questions[2 * i], 1))
        four.append(ask(url, questions[2 * i + 1], 4))
    print(f"n=1 median {statistics.median(one):.2f} s, n=4 median {statistics.median(four):.2f} s, "
          f"ratio {statistics.median(four) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
