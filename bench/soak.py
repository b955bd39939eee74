"""Soak: many concurrent streaming clients for minutes, some hanging up mid-stream.

    python -m bench.soak --clients 64 --duration 300            # starts knowmux serve on loopback
    python -m bench.soak --url http://127.0.0.1:8000 --pid PID  # a running server (PID for memory)

Each client loops: a streamed chat request (strategy mix from --strategies), reading
to [DONE], or, with probability --drop, closing the connection after the first chunk.
Checks: every response is 200 or a deliberate 429/503 carrying Retry-After; every
completed stream ends with exactly one finish chunk and [DONE]; no completion id is
seen twice; after the clients stop the engine's running batch and queue drain to zero
(dropped streams freed their slots); the server's resident memory (VmHWM, VmRSS) is
sampled throughout. Writes a JSON report and exits 1 if a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Optional

QUESTIONS = ["who wrote the declaration of independence", "when did the first world war start",
             "what is the capital of australia", "how many planets are in the solar system",
             "who painted the mona lisa", "what is the boiling point of water"]


def mem_kib(pid: Optional[int]) -> dict:
    """A process's resident memory now (VmRSS) and at its peak (VmHWM), in KiB ({} if unknown)."""
    if pid is None:
        return {}
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            k, v = line.split(":")
            out[k] = int(v.split()[0])
    return out


async def client(cid: int, http, url: str, stop_at: float, a, stats: Counter, ids: Counter, problems: list):
    rng = random.Random(cid)
    strategies = a.strategies.split(",")
    while time.time() < stop_at:
        strategy = rng.choice(strategies)
        body = {"model": a.model, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
                "max_tokens": a.max_tokens, "stream": True, "temperature": 0}
        drop = rng.random() < a.drop
        try:
            async with http.stream("POST", url + "/v1/chat/completions", json=body,
                                   headers={"X-Strategy": strategy}) as r:
                if r.status_code in (429, 503):
                    stats[f"status_{r.status_code}"] += 1
                    if "retry-after" not in r.headers:
                        problems.append(f"{r.status_code} without Retry-After")
                    await r.aread()
                    await asyncio.sleep(float(r.headers.get("retry-after", "1")))
                    continue
                if r.status_code != 200:
                    stats[f"status_{r.status_code}"] += 1
                    problems.append(f"status {r.status_code}: {(await r.aread())[:200]!r}")
                    continue
                finishes, done, rid = 0, False, None
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                        break
                    chunk = json.loads(data)
                    if "error" in chunk:
                        problems.append(f"stream error: {chunk['error']}")
                        break
                    rid = chunk.get("id", rid)
                    finishes += sum(1 for c in chunk.get("choices", []) if c.get("finish_reason"))
                    if drop:
                        break
                if drop:
                    stats["dropped"] += 1
                    continue
                if not done or finishes != 1:
                    problems.append(f"stream {rid}: done={done} finish chunks={finishes}")
                ids[rid] += 1
                stats["completed"] += 1
        except Exception as e:  # connection-level failures count as problems
            problems.append(f"{type(e).__name__}: {e}")
            stats["exceptions"] += 1


async def run(a, url: str, pid: Optional[int]) -> dict:
    import httpx

    stats, ids, problems = Counter(), Counter(), []
    mem = []
    stop_at = time.time() + a.duration
    limits = httpx.Limits(max_connections=a.clients + 8, max_keepalive_connections=a.clients + 8)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600, connect=30), limits=limits) as http:
        async def sample():
            while time.time() < stop_at + 5:
                m = mem_kib(pid)
                if m:
                    mem.append(m)
                await asyncio.sleep(1)

        sampler = asyncio.create_task(sample())
        t0 = time.time()
        await asyncio.gather(*(client(i, http, url, stop_at, a, stats, ids, problems) for i in range(a.clients)))
        wall = time.time() - t0
        # drained: dropped streams must have freed their slots
        drained = None
        for _ in range(60):
            h = (await http.get(url + "/health")).json()
            if h.get("running", 0) == 0 and h.get("queue", 0) == 0:
                drained = h
                break
            await asyncio.sleep(0.5)
        sampler.cancel()
    dup = [i for i, n in ids.items() if n > 1]
    if dup:
        problems.append(f"{len(dup)} completion ids answered twice")
    if drained is None:
        problems.append("engine did not drain: running/queue stayed above zero after the clients stopped")
    return {"clients": a.clients, "duration_s": a.duration, "wall_s": round(wall, 1), "drop": a.drop,
            "strategies": a.strategies, "max_tokens": a.max_tokens, "counts": dict(stats),
            "peak_rss_mib": round(max((m.get("VmHWM", 0) for m in mem), default=0) / 1024, 1) or None,
            "rss_first_mib": round(mem[0]["VmRSS"] / 1024, 1) if mem else None,
            "rss_last_mib": round(mem[-1]["VmRSS"] / 1024, 1) if mem else None,
            "problems": problems[:50], "n_problems": len(problems), "ok": not problems}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url")
    ap.add_argument("--pid", type=int, help="server process id, for memory sampling with --url")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=300, help="seconds")
    ap.add_argument("--drop", type=float, default=0.2, help="share of requests hung up after the first chunk")
    ap.add_argument("--strategies", default="direct,rag")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--model", default="knowmux")
    ap.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    a = ap.parse_args(argv)
    server = None
    if a.url:
        url, pid = a.url.rstrip("/"), a.pid
    else:
        from bench.run import Server, ingest_sample

        data_dir = Path(tempfile.mkdtemp(prefix="knowmux-soak-"))
        ingest_sample(data_dir)
        server = Server(data_dir, None, Path(tempfile.gettempdir()) / "knowmux-soak-server.log")
        server.wait()
        url, pid = server.url, server.proc.pid
    try:
        report = asyncio.run(run(a, url, pid))
    finally:
        if server is not None:
            server.stop()
    report["when"] = time.strftime("%Y-%m-%d %H:%M:%S")
    report["command"] = "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
