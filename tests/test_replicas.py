"""Replicas over one PostgreSQL store and one shared artefact tier: what one replica
ingests, builds or deletes, every other sees; a build whose replica dies is finished by
another; a job is run by one replica only."""

import signal
import threading
import time

import httpx
import numpy as np
import pytest

from tests.conftest import LiveServer, _free_port, start_tiny_server, wait_for_job

DOCS = [{"id": f"planet{i}", "title": f"Planet {i}",
         "text": f"The capital of planet {i} is the city of Vorn{i}, founded in year {3000 + i}."} for i in range(4)]


def _replica(tmp_path, embedder, url, name, tier, **settings):
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    s = Settings.from_env(env={}, data_dir=tmp_path / name, store=url, kv_tier=tier, job_lease_s=2.0, **settings)
    rt = Runtime.build(s, engine=tiny_engine(), embedder=embedder)
    srv = LiveServer(rt).__enter__()
    rt.jobs.resume(rt.builder)  # what Runtime.start does in `knowmux serve`: start claiming jobs
    return srv


def _ids(url, query, k=10):
    r = httpx.post(url + "/v1/retrieve", json={"query": query, "top_k": k}, timeout=30)
    assert r.status_code == 200, r.text
    return [h["id"] for h in r.json()["data"]]


def test_two_replicas_share_documents_builds_and_deletes(tmp_path, embedder, postgres):
    url = postgres.fresh_database("share")
    tier = f"file://{tmp_path / 'tier'}"
    a = _replica(tmp_path, embedder, url, "a", tier)
    b = _replica(tmp_path, embedder, url, "b", tier)
    try:
        # ingest through A, retrieve through B at once: B's next search catches up
        r = httpx.post(a.url + "/v1/documents", json={"documents": DOCS}, timeout=60)
        assert r.status_code == 200, r.text
        assert set(_ids(b.url, "capital of planet 2")) == {d["id"] for d in DOCS}
        assert _ids(b.url, "Vorn2 founded in year 3002", 1) == ["planet2"]
        assert httpx.get(b.url + "/v1/documents/planet3").json()["text"] == DOCS[3]["text"]
        assert b.runtime.placement()["document_store"]["kind"] == "postgresql"

        # a build started through A is seen by B and used by both (caches in the shared tier)
        job = httpx.post(a.url + "/v1/builds", json={"kind": "kv", "doc_ids": [d["id"] for d in DOCS]}).json()
        state = wait_for_job(b.url, job["id"], timeout=120)  # B reads the job A queued
        assert state["status"] == "done" and state["built"] == len(DOCS), state
        for srv in (a, b):
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "knowmux", "messages": [{"role": "user", "content": "What is the capital of planet 1?"}],
                "max_tokens": 4, "strategy": "kv", "top_k": 2})
            assert r.status_code == 200, r.text
            kv = r.json()["knowmux"]["kv"]
            assert kv["built_now"] == [] and not kv["missing"], kv  # nothing rebuilt: built once, used everywhere
        assert httpx.get(b.url + "/v1/jobs").json()["data"][0]["id"] == job["id"]

        # an update through B is what A retrieves; a delete through B is gone from A
        new = {"id": "planet1", "title": "Planet 1", "text": "Planet 1 was renamed Quell; its capital is Ostra."}
        assert httpx.post(b.url + "/v1/documents", json={"documents": [new]}).json()["data"][0]["status"] == "updated"
        assert httpx.get(a.url + "/v1/documents/planet1").json()["text"] == new["text"]
        assert _ids(a.url, "Quell capital Ostra", 1) == ["planet1"]
        assert httpx.delete(b.url + "/v1/documents/planet2").status_code == 200
        assert "planet2" not in _ids(a.url, "capital of planet 2")
        assert httpx.get(a.url + "/v1/documents/planet2").status_code == 404
        assert sorted(_ids(a.url, "planet", 10)) == sorted(_ids(b.url, "planet", 10)) == ["planet0", "planet1",
                                                                                           "planet3"]
    finally:
        a.__exit__(None, None, None)
        b.__exit__(None, None, None)


def test_a_replica_catches_up_from_its_saved_index_and_a_lost_connection_is_a_503(tmp_path, embedder, postgres):
    import psycopg

    from indexes import KnowledgeBase
    from indexes.store import Document

    url = postgres.fresh_database("catchup")
    kb = KnowledgeBase(tmp_path / "a", embedder, store=url)
    kb.upsert([Document(d["id"], d["text"], d["title"]) for d in DOCS[:2]])
    kb.close()
    other = KnowledgeBase(tmp_path / "b", embedder, store=url)  # writes while A is down
    other.upsert([Document(d["id"], d["text"], d["title"]) for d in DOCS[2:]])
    other.delete("planet0")
    kb = KnowledgeBase(tmp_path / "a", embedder, store=url)  # its saved index, caught up, not rebuilt
    assert kb._gen == other.store.generation
    assert sorted(h.doc_id for h in kb.search("planet", 10)) == ["planet1", "planet2", "planet3"]
    ids, embs, _ = kb.store.all_embeddings(embedder.dim)  # equal to a rebuild from the store
    assert kb._index.size == len(ids) == 3

    # the server's connection is cut: that request is a 503 with Retry-After, the next one reconnects
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    kb.close()
    other.close()
    rt = Runtime.build(Settings.from_env(env={}, data_dir=tmp_path / "a", store=url), engine=tiny_engine(),
                       embedder=embedder)
    with LiveServer(rt) as srv:
        assert _ids(srv.url, "Vorn3", 1) == ["planet3"]
        with psycopg.connect(postgres.url, autocommit=True) as admin:
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = 'catchup' "
                          "AND pid <> pg_backend_pid()")
        r = httpx.post(srv.url + "/v1/retrieve", json={"query": "Vorn3", "top_k": 1})
        assert r.status_code == 503 and r.json()["error"]["code"] == "store_unavailable", r.text
        assert "Retry-After" in r.headers
        assert _ids(srv.url, "Vorn3", 1) == ["planet3"]


def test_an_unreachable_store_stops_the_start_with_a_clear_message(tmp_path, embedder):
    from indexes import KnowledgeBase
    from indexes.pgstore import StoreUnavailable

    with pytest.raises(StoreUnavailable, match="cannot reach the document store postgresql://u:\\*\\*\\*@127"):
        KnowledgeBase(tmp_path, embedder, store=f"postgresql://u:secret@127.0.0.1:{_free_port()}/x")
    with pytest.raises(ValueError, match="postgresql://"):
        KnowledgeBase(tmp_path, embedder, store="mysql://x")


def test_the_cli_reports_an_unreachable_store_in_one_line(tmp_path, capsys):
    from server.cli import main

    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "alpha"}\n')
    url = f"postgresql://u:secret@127.0.0.1:{_free_port()}/x"
    assert main(["ingest", str(corpus), "--data-dir", str(tmp_path / "d"), "--store", url]) == 2
    err = capsys.readouterr().err
    assert "knowmux: cannot reach the document store postgresql://u:***@127.0.0.1" in err and "secret" not in err
    assert "Traceback" not in err
    assert main(["serve", "--store", "mysql://x", "--data-dir", str(tmp_path / "d")]) == 2
    assert "KNOWMUX_STORE must be" in capsys.readouterr().err


def test_concurrent_writers_commit_their_changes_in_order(tmp_path, postgres):
    """Two stores writing at once: a reader that catches up step by step ends with exactly
    the documents in the table (no change numbered below one already read commits late)."""
    from indexes.pgstore import PostgresStore
    from indexes.store import Document

    url = postgres.fresh_database("order")
    stores = [PostgresStore(url) for _ in range(3)]
    reader, seen, gen = stores[2], set(), 0

    def write(store, w):
        for i in range(30):
            store.upsert([Document(f"w{w}-{i % 7}", f"text {w} {i}")], np.full((1, 4), i, np.float32))
            if i % 5 == 4:
                store.delete(f"w{w}-{i % 3}")

    threads = [threading.Thread(target=write, args=(s, w)) for w, s in enumerate(stores[:2])]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads) or gen != reader.generation:
        removed, added, _, gen = reader.changes_since(gen, 4)
        seen -= set(removed)
        seen |= set(added.tolist())
    ids, _, _ = reader.all_embeddings(4)
    assert seen == set(ids.tolist())


def test_each_job_runs_on_one_replica_only(postgres):
    """Three managers claiming from one queue (SKIP LOCKED): every job runs exactly once."""
    from server.jobs import Builder
    from server.shared_jobs import SharedJobManager

    url = postgres.fresh_database("claims")
    ran, lock = [], threading.Lock()

    def build(ids):
        with lock:
            ran.extend(ids)
        time.sleep(0.01)
        return [True] * len(ids)

    managers = [SharedJobManager(url, lease_s=5, poll_s=0.05) for _ in range(3)]
    jobs = [managers[0].submit("kv", [f"j{j}-d{d}" for d in range(3)], None) for j in range(12)]
    for m in managers:
        m.resume(lambda kind: Builder(build, 1) if kind == "kv" else (_ for _ in ()).throw(RuntimeError("no")))
    deadline = time.time() + 60
    while time.time() < deadline and any(managers[1].get(j.id).status != "done" for j in jobs):
        time.sleep(0.1)
    for m in managers:
        m.shutdown()
    assert sorted(ran) == sorted(f"j{j}-d{d}" for j in range(12) for d in range(3))  # each document once


def test_a_replica_shutting_down_hands_its_job_back_at_once(postgres):
    """A graceful stop hands the running job back (queued at its done count): another
    replica takes it without waiting for the lease."""
    from server.jobs import Builder
    from server.shared_jobs import SharedJobManager

    url = postgres.fresh_database("handback")
    started, ran = threading.Event(), []

    def slow(ids):
        started.set()
        time.sleep(0.3)
        ran.extend(ids)
        return [True] * len(ids)

    a, b = (SharedJobManager(url, lease_s=600, poll_s=0.05) for _ in range(2))
    job = a.submit("kv", [f"d{i}" for i in range(20)], None)
    a.resume(lambda kind: Builder(slow, 1))
    assert started.wait(30)
    a.shutdown()
    mid = b.get(job.id)
    assert mid.status == "queued" and 0 < mid.done < 20, mid
    b.resume(lambda kind: Builder(slow, 1))
    deadline = time.time() + 60
    while time.time() < deadline and b.get(job.id).status != "done":
        time.sleep(0.1)
    end = b.get(job.id)
    b.shutdown()
    assert end.status == "done" and end.done == 20 and end.resumed == 1 and end.worker == b.owner, end
    assert sorted(ran) == sorted(f"d{i}" for i in range(20))  # the handed-back group is not run twice


def test_builds_run_on_a_ray_worker_and_every_replica_uses_them(tmp_path, embedder, postgres):
    """--builds ray:local: the replica holds the job, a Ray actor loading the same model
    folder builds the KV caches into the shared tier, and the replica serves from them."""
    from server.config import Settings
    from server.engine.torch_engine import TorchEngine
    from server.runtime import Runtime
    from tests.tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "model")
    tier = tmp_path / "tier"
    s = Settings.from_env(env={}, data_dir=tmp_path / "a", model=str(folder), device="cpu", threads=1,
                          store=postgres.fresh_database("ray"), kv_tier=tier.as_uri(), builds="ray:local")
    rt = Runtime.build(s, engine=TorchEngine.from_folder(folder), embedder=embedder)
    try:
        with LiveServer(rt) as srv:
            rt.jobs.resume(rt.builder)
            r = httpx.post(srv.url + "/v1/documents", json={"documents": DOCS, "build": ["kv"]}, timeout=60)
            assert r.status_code == 200, r.text
            state = wait_for_job(srv.url, r.json()["job"]["id"], timeout=240)
            assert state["status"] == "done" and state["built"] == len(DOCS), state
            assert state["worker"] == rt.jobs.owner  # held here ...
            assert not any((tmp_path / "a" / "kv").glob("*.safetensors"))  # ... built elsewhere
            assert len(list((tier / "kv").glob("*"))) >= len(DOCS)  # into the shared tier
            r = httpx.post(srv.url + "/v1/chat/completions", timeout=60, json={
                "model": "knowmux", "messages": [{"role": "user", "content": "What is the capital of planet 1?"}],
                "max_tokens": 4, "strategy": "kv", "top_k": 2})
            assert r.status_code == 200 and r.json()["knowmux"]["kv"]["built_now"] == [], r.text
    finally:
        rt.builds.shutdown()


def test_ray_builds_need_a_shared_store_and_tier(tmp_path):
    from server.config import Settings

    with pytest.raises(ValueError, match="need a shared document store"):
        Settings.from_env(env={}, data_dir=tmp_path, builds="ray://head:10001")
    with pytest.raises(ValueError, match="ray://head:port"):
        Settings.from_env(env={}, data_dir=tmp_path, builds="dask://x", store="postgresql://h/db", kv_tier="file:///t")


def test_sigkill_a_replica_mid_build_and_another_finishes_the_job(tmp_path, postgres):
    env = {"KNOWMUX_STORE": postgres.fresh_database("kill"), "KNOWMUX_JOB_LEASE_S": "2",
           "KNOWMUX_KV_TIER": f"file://{tmp_path / 'tier'}", "KNOWMUX_ADAPTER_BUILD_GROUP": "1"}
    log = open(tmp_path / "servers.log", "w")
    a, url_a = start_tiny_server(tmp_path / "a", log, **env)
    b = None
    try:
        docs = [{"id": f"doc{i}", "text": f"The secret number of item {i} is {1000 + i}. " * 3} for i in range(5)]
        r = httpx.post(url_a + "/v1/documents", json={"documents": docs, "build": ["adapters"]}, timeout=60)
        assert r.status_code == 200, r.text
        job = r.json()["job"]["id"]
        deadline = time.time() + 120
        while time.time() < deadline and httpx.get(f"{url_a}/v1/jobs/{job}").json()["done"] < 1:
            time.sleep(0.05)
        a.send_signal(signal.SIGKILL)  # A holds the job, one or more adapters built
        a.wait(timeout=30)
        b, url_b = start_tiny_server(tmp_path / "b", log, **env)
        state = wait_for_job(url_b, job, timeout=240)
        assert state["status"] == "done" and state["done"] == state["total"] == 5 and not state["errors"], state
        assert state["resumed"] >= 1 and state["built"] + state["skipped"] >= 5
        for d in docs:  # every acknowledged document is there with its adapter (from the tier or built by B)
            assert httpx.get(f"{url_b}/v1/documents/{d['id']}").status_code == 200
            assert httpx.get(f"{url_b}/v1/adapters/{d['id']}").json()["stored"], d["id"]
    finally:
        for p in (a, b):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                p.wait(timeout=30)
        log.close()
