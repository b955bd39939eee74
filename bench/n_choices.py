"""Cost of n choices against one: a rag request with n=4 against one with n=1.

    python -m bench.n_choices [http://127.0.0.1:8000]   # a running knowmux server with the NQ sample

Sampled (temperature 1, seed 1), 32 tokens each, eos ignored; n=1 and n=4 alternate over
distinct questions never asked before (so the prefix cache holds none of their prompts).
Prints the medians and their ratio: 4.0 would be four requests' worth of work.
"""

from __future__ import annotations

import statistics
import sys

import httpx

from bench.compare import ask
from bench.load import load_questions


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000"
    questions = load_questions(17, offset=40)
    sampled = dict(temperature=1.0, seed=1, strategy="rag")  # over compare's greedy defaults
    one, four = [], []
    with httpx.Client(timeout=600) as client:
        ask(client, url, questions[16], 32, n=1, **sampled)  # warm-up
        for i in range(8):
            one.append(ask(client, url, questions[2 * i], 32, n=1, **sampled)[0])
            four.append(ask(client, url, questions[2 * i + 1], 32, n=4, **sampled)[0])
    print(f"n=1 median {statistics.median(one):.2f} s, n=4 median {statistics.median(four):.2f} s, "
          f"ratio {statistics.median(four) / statistics.median(one):.2f}")


if __name__ == "__main__":
    main()
