"""Comparing strategies per question: one request naming them all, against one request each.

    python -m bench.compare [--strategies direct,rag,rag+ckplug] [--questions 12] [--out FILE]

Starts a knowmux server (torch engine) on loopback with the bundled NQ sample ingested.
For each question, greedy, ``--max-tokens`` tokens: the strategies asked one after another
(what a client comparing them without ``strategies`` does), and one request with
``"strategies": [...]``, whose choices share the engine's forward passes. The two modes
alternate in order from question to question. Reports the wall time per question of each
mode, their ratio, and whether the answers are the same token for token.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import httpx

from bench.batching import ingest_sample, start_knowmux, stop, wait_ready
from bench.load import load_questions


def ask(client: httpx.Client, url: str, question: str, max_tokens: int, **extra) -> tuple[float, list[str]]:
    """Wall time of one request and its choices' texts, in choice order."""
    t0 = time.perf_counter()
    r = client.post(url + "/v1/chat/completions", json={
        "model": "knowmux", "messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
        "temperature": 0, "ignore_eos": True, **extra})
    r.raise_for_status()
    return time.perf_counter() - t0, [c["message"]["content"] for c in r.json()["choices"]]


def run(url: str, questions: list[str], strategies: list[str], max_tokens: int) -> dict:
    one_each, together, same = [], [], 0
    with httpx.Client(timeout=600) as client:
        ask(client, url, questions[0], 4, strategies=strategies)  # warm-up
        for i, q in enumerate(questions):
            def sequential():
                answers, total = [], 0.0
                for s in strategies:
                    t, (text,) = ask(client, url, q, max_tokens, strategy=s)
                    total += t
                    answers.append(text)
                return total, answers

            def batched():
                return ask(client, url, q, max_tokens, strategies=strategies)

            if i % 2 == 0:
                (ts, a_seq), (tb, a_bat) = sequential(), batched()
            else:
                (tb, a_bat), (ts, a_seq) = batched(), sequential()
            one_each.append(ts)
            together.append(tb)
            same += a_seq == a_bat
    return {"one_request_each_s": one_each, "one_request_all_s": together,
            "median_one_each_s": statistics.median(one_each), "median_all_s": statistics.median(together),
            "speedup_median": statistics.median(a / b for a, b in zip(one_each, together)),
            "identical_answers": same, "questions": len(questions)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--strategies", default="direct,rag,rag+ckplug")
    ap.add_argument("--questions", type=int, default=12)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--data-dir", default="runs/batching-data")
    ap.add_argument("--out", default="bench/results/compare.json")
    a = ap.parse_args()
    strategies = [s for s in a.strategies.split(",") if s]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    ingest_sample(a.data_dir, env)
    port = 8124
    url = f"http://127.0.0.1:{port}"
    proc = start_knowmux(a.data_dir, port, env)
    try:
        wait_ready(url, proc)
        res = run(url, load_questions(a.questions), strategies, a.max_tokens)
    finally:
        stop(proc)
    out = {"when": time.strftime("%Y-%m-%d %H:%M:%S"), "strategies": strategies, "max_tokens": a.max_tokens, **res}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"{len(strategies)} strategies ({', '.join(strategies)}), {res['questions']} questions, "
          f"{a.max_tokens} tokens each, greedy")
    print(f"one request per strategy: median {res['median_one_each_s']:.2f} s per question")
    print(f"one request naming all:   median {res['median_all_s']:.2f} s per question")
    print(f"speed-up (median of per-question ratios): {res['speedup_median']:.2f}x; "
          f"identical answers for {res['identical_answers']} of {res['questions']} questions")


if __name__ == "__main__":
    main()
