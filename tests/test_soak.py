"""The soak run's short version (bench/soak.py has the long one, on the real model):
64 concurrent streaming clients on a tiny model, a third hanging up mid-stream."""

import asyncio
import os
from types import SimpleNamespace

import httpx

DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."}]


def test_short_soak_64_clients_with_drops(make_server):
    from bench.soak import run

    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    a = SimpleNamespace(clients=64, duration=8.0, drop=0.3, strategies="direct,rag", max_tokens=16, model="knowmux")
    report = asyncio.run(run(a, srv.url, os.getpid()))
    assert report["ok"], report["problems"]
    assert report["counts"]["completed"] > 64 and report["counts"]["dropped"] > 10
    assert set(report["counts"]) <= {"completed", "dropped", "status_429", "status_503"}
    h = httpx.get(srv.url + "/health").json()
    assert h["running"] == 0 and h["queue"] == 0 and h["kv_in_flight"] == 0
