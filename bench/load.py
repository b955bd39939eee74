"""Concurrent streaming clients against an OpenAI-compatible server (knowmux or vLLM).

    python -m bench.load --url http://127.0.0.1:8000 --strategy rag --concurrency 1,4,8,16

At each concurrency level C, C clients start together and each sends ``--requests``
chat requests one after another (questions from the bundled NQ sample), streaming,
greedy, ``ignore_eos`` so every answer has exactly ``--max-tokens`` tokens. Reports
aggregate completion tokens/s, and p50/p95 of time to first token and of latency.

For a server that does no retrieval itself (vLLM), ``--inline-rag DATA_DIR`` retrieves
the top-k passages client-side from a knowmux data dir and sends them in the system
message in knowmux's own layout, so both servers prefill the same kind of prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from bench.metrics import percentile

QUESTIONS = Path(__file__).parent / "data" / "nq_open_sample" / "questions.jsonl"


def load_questions(n: int, offset: int = 0) -> list[str]:
    with open(QUESTIONS, encoding="utf-8") as f:
        qs = [json.loads(line)["question"] for line in f]
    return [qs[(offset + i) % len(qs)] for i in range(n)]


class InlineRag:
    def __init__(self, data_dir: str, top_k: int):
        from indexes import KnowledgeBase
        from indexes.embedder import Embedder
        from server.prompt import get_layout

        self.kb, self.k = KnowledgeBase(Path(data_dir), Embedder()), top_k
        self.layout = get_layout(None)  # the tokens knowmux's default layout prefills

    def messages(self, question: str) -> list[dict]:
        hits = self.kb.search(question, self.k)
        docs = self.kb.get_many([h.doc_id for h in hits])
        spec = self.layout
        passages = "".join(spec.wrapper.format(title=docs[h.doc_id].title, text=docs[h.doc_id].text) for h in hits)
        if spec.placement == "system":
            return [{"role": "system", "content": spec.system + spec.intro + passages},
                    {"role": "user", "content": spec.before_question + question}]
        system = [{"role": "system", "content": spec.system}] if spec.system else []
        return system + [{"role": "user", "content": spec.intro + passages + spec.before_question + question}]


async def one_request(client, model: str, messages, strategy: str, max_tokens: int, top_k: int) -> dict:
    t0 = time.perf_counter()
    ttft = None
    usage = None
    stream = await client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers={"X-Strategy": strategy},
        extra_body={"ignore_eos": True, "top_k": top_k})
    async for chunk in stream:
        if ttft is None and chunk.choices and chunk.choices[0].delta.content:
            ttft = time.perf_counter() - t0
        if chunk.usage is not None:
            usage = chunk.usage
    return {"ttft": ttft if ttft is not None else time.perf_counter() - t0, "latency": time.perf_counter() - t0,
            "completion_tokens": usage.completion_tokens if usage else 0,
            "prompt_tokens": usage.prompt_tokens if usage else 0}


async def level(client, model, concurrency, requests, strategy, max_tokens, top_k, rag, offset: int = 0) -> dict:
    # each level asks questions no earlier level asked, so no prompt is served from a
    # prefix cache filled by a previous level (knowmux's or vLLM's)
    questions = load_questions(concurrency * requests, offset)

    async def client_task(i):
        out = []
        for j in range(requests):
            q = questions[i * requests + j]
            msgs = rag.messages(q) if rag else [{"role": "user", "content": q}]
            out.append(await one_request(client, model, msgs, strategy, max_tokens, top_k))
        return out

    t0 = time.perf_counter()
    results = [r for rs in await asyncio.gather(*(client_task(i) for i in range(concurrency))) for r in rs]
    wall = time.perf_counter() - t0
    lat, ttft = [r["latency"] for r in results], [r["ttft"] for r in results]
    return {"concurrency": concurrency, "requests": len(results), "wall_s": wall,
            "tokens_per_s": sum(r["completion_tokens"] for r in results) / wall,
            "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
            "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
            "mean_prompt_tokens": statistics.mean(r["prompt_tokens"] for r in results)}


async def run(url, model, levels, requests, strategy, max_tokens, top_k, inline_rag, offset: int = 1) -> list[dict]:
    import openai

    rag = InlineRag(inline_rag, top_k) if inline_rag else None
    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=600)
    await one_request(client, model, [{"role": "user", "content": "warm up"}], strategy, 4, top_k)
    out = []  # consecutive slices of the question list from `offset`, one per level
    for c in levels:
        out.append(await level(client, model, c, requests, strategy, max_tokens, top_k, rag, offset))
        offset += c * requests
        r = out[-1]
        print(f"{strategy:7} c={c:<3} {r['tokens_per_s']:7.1f} tok/s  ttft p50 {r['ttft_p50_s']:.2f}s "
              f"p95 {r['ttft_p95_s']:.2f}s  latency p50 {r['latency_p50_s']:.2f}s p95 {r['latency_p95_s']:.2f}s  "
              f"prompt {r['mean_prompt_tokens']:.0f} tok", flush=True)
    return out


def main_levels(url, model, levels, requests, strategy, max_tokens, inline_rag, top_k: int = 3,
                offset: int = 1) -> list[dict]:
    return asyncio.run(run(url, model, levels, requests, strategy, max_tokens, top_k, inline_rag, offset))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", default="knowmux", help="model name the server expects")
    ap.add_argument("--strategy", default="direct")
    ap.add_argument("--concurrency", default="1,4,8,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=3)
    ap.add_argument("--inline-rag", metavar="DATA_DIR")
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    levels = [int(x) for x in a.concurrency.split(",")]
    res = main_levels(a.url, a.model, levels, a.requests, a.strategy, a.max_tokens, a.inline_rag, a.top_k)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
