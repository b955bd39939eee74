"""kill -9 in the middle of an ingest with KV and adapter builds: after a restart on the
same data dir every acknowledged document is there, nothing half-written is visible, and
the interrupted builds resume and finish."""

import signal
import time

import httpx

from tests.conftest import start_tiny_server as _start


def _job(url, job_id):
    return httpx.get(f"{url}/v1/jobs/{job_id}", timeout=10).json()


def test_sigkill_mid_build_loses_nothing_acknowledged_and_resumes(tmp_path):
    data = tmp_path / "data"
    log = open(tmp_path / "server.log", "w")
    proc, url = _start(data, log)
    docs = [{"id": f"doc{i}", "title": f"Fact {i}", "text": f"The secret number of item {i} is {1000 + i}. " * 3}
            for i in range(6)]
    acked, jobs = [], []
    try:
        for batch in (docs[:3], docs[3:]):
            r = httpx.post(url + "/v1/documents", json={"documents": batch, "build": ["kv", "adapters"]}, timeout=60)
            assert r.status_code == 200
            acked += [d["id"] for d in r.json()["data"]]
            jobs += [j["id"] for j in r.json()["jobs"]]
        # wait until the adapter builds are under way (the kv job of the first batch runs first)
        deadline = time.time() + 120
        while time.time() < deadline:
            if any(_job(url, j)["status"] == "running" for j in jobs):
                break
            time.sleep(0.1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    # nothing half-written is visible: every visible artefact is whole
    from adapters.bank import AdapterBank
    from server.kv.store import KVStore

    store = KVStore(data / "kv")
    for f in (data / "kv").glob("[!.]*.safetensors"):
        entry, where = store.get(f.stem)
        assert entry is not None, (f.name, where)
    bank = AdapterBank(data / "adapters")
    visible = [p for p in (data / "adapters").iterdir() if not p.name.startswith(".")]
    for folder in visible:
        assert bank.has(folder.name), folder  # a visible adapter folder is a complete one
    proc, url = _start(data, log)
    try:
        for doc_id in acked:
            assert httpx.get(f"{url}/v1/documents/{doc_id}").status_code == 200, doc_id
        hits = httpx.post(url + "/v1/retrieve", json={"query": "secret number of item 4", "top_k": 6}).json()
        assert {h["id"] for h in hits["data"]} == set(acked)  # index and store agree after the crash
        deadline = time.time() + 300
        while time.time() < deadline:
            views = [_job(url, j) for j in jobs]
            if all(v["status"] in ("done", "failed") for v in views):
                break
            time.sleep(0.2)
        assert all(v["status"] == "done" and v["done"] == v["total"] and not v["errors"] for v in views), views
        assert any(v["resumed"] for v in views)
        for doc_id in acked:  # every acknowledged document ends with both artefacts
            assert httpx.get(f"{url}/v1/kv/{doc_id}").json()["stored"], doc_id
            assert httpx.get(f"{url}/v1/adapters/{doc_id}").json()["stored"], doc_id
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        log.close()


def test_a_dead_engine_gives_503s_then_a_clean_nonzero_exit(tmp_path):
    """Never a hung server: the in-flight request fails, the next gets 503, and the process
    shuts down cleanly with exit status 1 for its supervisor to restart it."""
    with open(tmp_path / "server.log", "w") as log:
        proc, url = _start(tmp_path / "data", log, KNOWMUX_TEST_BREAK_ENGINE="1")
        try:
            body = {"model": "knowmux", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
            first = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert first.status_code in (500, 503)
            second = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
            assert second.status_code == 503 and second.headers["retry-after"]
            assert proc.wait(timeout=60) == 1
        finally:
            if proc.poll() is None:
                proc.kill()
    assert "shutting down so a supervisor can restart" in (tmp_path / "server.log").read_text()
