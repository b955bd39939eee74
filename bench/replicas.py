"""Replicas over one PostgreSQL store against the embedded SQLite store, in one run.

    python -m bench.replicas --out bench/results/replicas.json [--store postgresql://...]

Starts its own PostgreSQL server (bench.postgres) unless --store names one. Three parts:

1. store: the same documents (NQ-open oracle passages + the 2WikiMultihopQA distractors)
   ingested into a fresh SQLite store and a fresh PostgreSQL store, in batches of 64, with
   their embeddings computed once beforehand (so the store and index are timed, not the
   embedder; the embedder's share is timed apart on the first batches); then the same
   queries searched in both, alternating query by query (each search includes the
   store's generation check and the id lookup).
2. catch-up: two replicas (two KnowledgeBases) over one PostgreSQL store. A writes one
   document; B searches for it at once: how many searches and how long until B finds it.
   Then B's first search after A wrote 1,000 documents, and B restarting from its saved
   index (catching up) against rebuilding from the store.
3. builds: --build-docs KV caches as jobs of --job-docs documents each, submitted to
   one `knowmux serve --store` replica, then to two over the same store (fresh databases
   and data dirs each time). SmolLM2 on this machine's cores: one replica with all the
   threads, one with half of them, two with half each. Reports wall time and which
   replica ran each job.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.datasets import distractors_2wiki, nq_open_oracle
from bench.metrics import percentile

BATCH = 64


class CachedEmbedder:
    """The real embedder's vectors, computed once: the stores are timed, not the model."""

    def __init__(self, embedder, texts: list[str]):
        self.dim = embedder.dim
        vecs = embedder.encode(texts)
        self.table = {t: v for t, v in zip(texts, vecs)}

    def encode(self, texts):
        return np.stack([self.table[t] for t in texts])


def _docs(root: Path, limit: int):
    from indexes.store import Document

    ds = nq_open_oracle(root)
    rows = ds.corpus + distractors_2wiki(root)
    docs = [Document(r["id"], r["text"], r.get("title", "")) for r in rows[:limit]]
    return docs, [q.question for q in ds.questions]


def _stats(values: list[float]) -> dict:
    return {"n": len(values), "p50_ms": round(percentile(values, 50) * 1e3, 3),
            "p95_ms": round(percentile(values, 95) * 1e3, 3), "mean_ms": round(float(np.mean(values)) * 1e3, 3)}


def part_store(pg, root: Path, work: Path, n_docs: int, n_queries: int, embedder) -> dict:
    from indexes import KnowledgeBase
    from indexes.knowledge import _embed_text

    docs, questions = _docs(root, n_docs)
    questions = questions[:n_queries]
    t0 = time.perf_counter()
    cached = CachedEmbedder(embedder, [_embed_text(d) for d in docs] + questions)
    embed_s = time.perf_counter() - t0
    out = {"documents": len(docs), "queries": len(questions),
           "embedding_s_per_doc_this_machine": round(embed_s / (len(docs) + len(questions)), 5)}
    kbs = {"sqlite": KnowledgeBase(work / "sqlite", cached),
           "postgresql": KnowledgeBase(work / "pg", cached, store=pg.fresh_database("bench_store"))}
    for name, kb in kbs.items():
        batches = []
        for i in range(0, len(docs), BATCH):
            t = time.perf_counter()
            kb.upsert(docs[i:i + BATCH])
            batches.append(time.perf_counter() - t)
        out[f"ingest_{name}"] = {"wall_s": round(sum(batches), 3), "batch": _stats(batches),
                                 "docs_per_s": round(len(docs) / sum(batches), 1)}
    qvecs = cached.encode(questions)
    times = {name: [] for name in kbs}
    same = 0
    for v in qvecs:  # alternating, so drift on a shared machine hits both alike
        got = {}
        for name, kb in kbs.items():
            t = time.perf_counter()
            got[name] = [h.doc_id for h in kb.search_vector(v, 3)]
            times[name].append(time.perf_counter() - t)
        same += got["sqlite"] == got["postgresql"]
    for name in kbs:
        out[f"search_{name}"] = _stats(times[name])
    out["same_top3"] = f"{same} / {len(qvecs)}"
    for kb in kbs.values():
        kb.close()
    return out


def part_catch_up(pg, root: Path, work: Path, embedder, n_bulk: int) -> dict:
    from indexes import KnowledgeBase
    from indexes.knowledge import _embed_text
    from indexes.store import Document

    url = pg.fresh_database("bench_catchup")
    base, _ = _docs(root, 2000)
    fresh = [Document(f"new-{i}", f"Invented fact number {i}: the tower of Quillon {i} is {100 + i} metres tall.")
             for i in range(50 + 2 * n_bulk)]
    cached = CachedEmbedder(embedder, [_embed_text(d) for d in base + fresh])
    a, b = KnowledgeBase(work / "a", cached, store=url), KnowledgeBase(work / "b", cached, store=url)
    a.upsert(base)
    b.search_vector(cached.encode([_embed_text(base[0])])[0], 1)
    delays, searches = [], []
    for d in fresh[:50]:
        v = cached.encode([_embed_text(d)])[0]
        a.upsert([d])
        t0, n = time.perf_counter(), 0
        while True:
            n += 1
            if [h.doc_id for h in b.search_vector(v, 1)] == [d.id]:
                break
        delays.append(time.perf_counter() - t0)
        searches.append(n)
    out = {"ack_to_found_on_b": _stats(delays), "searches_until_found": {"max": max(searches),
                                                                         "mean": float(np.mean(searches))}}
    v = cached.encode([_embed_text(base[1])])[0]
    plain = []
    for _ in range(20):
        t = time.perf_counter()
        b.search_vector(v, 3)
        plain.append(time.perf_counter() - t)
    bulk = fresh[50:50 + n_bulk]
    for i in range(0, len(bulk), BATCH):
        a.upsert(bulk[i:i + BATCH])
    t = time.perf_counter()
    b.search_vector(v, 3)
    out[f"b_search_after_a_wrote_{n_bulk}_docs_ms"] = round((time.perf_counter() - t) * 1e3, 2)
    out["b_search_nothing_new"] = _stats(plain)
    b.close()
    more = fresh[50 + n_bulk:]
    for i in range(0, len(more), BATCH):
        a.upsert(more[i:i + BATCH])
    t = time.perf_counter()
    b = KnowledgeBase(work / "b", cached, store=url)  # its saved index, then the changes since
    out[f"b_restart_catching_up_{n_bulk}_docs_s"] = round(time.perf_counter() - t, 3)
    b.close()
    (work / "b" / "index.faiss").unlink()
    t = time.perf_counter()
    b = KnowledgeBase(work / "b", cached, store=url)  # no saved index: rebuilt from every stored embedding
    out[f"b_restart_rebuilding_{b.count()}_docs_s"] = round(time.perf_counter() - t, 3)
    b.close()
    a.close()
    return out


def part_builds(pg, root: Path, work: Path, n_docs: int, job_docs: int, threads: int, model) -> dict:
    import httpx

    from bench.run import Server

    docs, _ = _docs(root, n_docs)
    payload = [{"id": d.id, "title": d.title, "text": d.text} for d in docs]
    out = {"documents": n_docs, "job_docs": job_docs, "threads_total": threads}
    work.mkdir(parents=True, exist_ok=True)
    for replicas, each in ((1, threads), (1, max(1, threads // 2)), (2, max(1, threads // 2))):
        name = f"{replicas}x{each}"
        url = pg.fresh_database(f"bench_builds_{replicas}_{each}")
        tier = work / f"tier{name}"
        args = ["--store", url, "--kv-tier", tier.as_uri(), "--threads", str(each)]
        servers = [Server(work / f"builds{name}-{i}", model, work / f"builds{name}-{i}.log", args)
                   for i in range(replicas)]
        try:
            for s in servers:
                s.wait()
            first = servers[0].url
            r = httpx.post(first + "/v1/documents", json={"documents": payload}, timeout=600)
            r.raise_for_status()
            t0 = time.perf_counter()
            jobs = [httpx.post(first + "/v1/builds", json={"kind": "kv", "doc_ids": [d.id for d in
                                                                                    docs[i:i + job_docs]]},
                               timeout=60).json()["id"] for i in range(0, n_docs, job_docs)]
            views = []
            while True:
                views = [httpx.get(f"{first}/v1/jobs/{j}", timeout=30).json() for j in jobs]
                if all(v["status"] not in ("queued", "running") for v in views):
                    break
                time.sleep(0.2)
            wall = time.perf_counter() - t0
            workers = sorted({v["worker"] for v in views})
            out[f"{replicas}_replica{'s' if replicas > 1 else ''}_{each}_thread{'s' if each > 1 else ''}_each"] = {
                "wall_s": round(wall, 2), "built": sum(v["built"] for v in views),
                "errors": sum(len(v["errors"]) for v in views),
                "jobs_per_replica": [sum(v["worker"] == w for v in views) for w in workers],
                "threads_each": each}
        finally:
            for s in servers:
                s.stop()
    walls = {k: v["wall_s"] for k, v in out.items() if isinstance(v, dict)}
    two = next(v for k, v in walls.items() if k.startswith("2_"))
    out["two_replicas_over_each_one_replica_wall"] = {k: round(two / v, 3) for k, v in walls.items()
                                                       if k.startswith("1_")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", type=Path, default=Path("../shared/data"))
    ap.add_argument("--docs", type=int, default=8000, help="documents in the store comparison")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--bulk", type=int, default=1000, help="documents written behind a replica's back")
    ap.add_argument("--build-docs", type=int, default=40)
    ap.add_argument("--job-docs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--model", default=None)
    ap.add_argument("--parts", default="store,catch_up,builds")
    ap.add_argument("--store", help="an existing PostgreSQL server's URL (its databases bench_* are created)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/replicas.json"))
    a = ap.parse_args(argv)
    from bench.postgres import Postgres, external
    from indexes.embedder import Embedder

    work = Path(tempfile.mkdtemp(prefix="knowmux-replicas-"))
    pg = external(a.store) if a.store else Postgres(work / "pg", _port()).start()
    command = "python -m bench.replicas " + " ".join(argv if argv is not None else os.sys.argv[1:])
    # parts run later are merged into the file (each part is one run of its own comparison)
    result = json.loads(a.out.read_text()) if a.out.exists() else {}
    result["machine_cores"] = os.cpu_count()
    a.out.parent.mkdir(parents=True, exist_ok=True)
    try:
        parts = a.parts.split(",")
        embedder = Embedder() if {"store", "catch_up"} & set(parts) else None
        runs = {"store": lambda: part_store(pg, a.data_root, work / "store", a.docs, a.queries, embedder),
                "catch_up": lambda: part_catch_up(pg, a.data_root, work / "catch", embedder, a.bulk),
                "builds": lambda: part_builds(pg, a.data_root, work / "builds", a.build_docs, a.job_docs,
                                              a.threads, a.model)}
        for part in parts:
            result[part] = {"command": command, "when": time.strftime("%Y-%m-%d %H:%M"), **runs[part]()}
            print(json.dumps(result[part], indent=1), flush=True)
            a.out.write_text(json.dumps(result, indent=1))
    finally:
        pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {a.out}")
    return 0


def _port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    raise SystemExit(main())
