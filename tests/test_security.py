"""Access keys, identifiers that must never become paths, what may live in the data dir,
artefact reference counts on delete, and damaged stores."""

import json
import re
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

ADMIN, CLIENT = "admin-key-0123456789abcdef", "client-key-0123456789abcdef"
DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."},
        {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}]
ASK = [{"role": "user", "content": "Where does Zorbl the cat live?"}]
ROOT = Path(__file__).resolve().parents[1]


def _auth(key):
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def keyed(make_server):
    return make_server(admin_key=ADMIN, api_keys=CLIENT)


def test_keys_guard_admin_and_client_endpoints(keyed):
    url = keyed.url
    chat = {"model": "knowmux", "messages": ASK, "max_tokens": 2}
    # admin only: documents, builds, jobs, reloads
    for key in (None, CLIENT, "admin-key-0123456789abcdeX", "x"):
        r = httpx.post(url + "/v1/documents", json={"documents": DOCS}, headers=_auth(key) if key is not None else {})
        assert r.status_code == 401, (key, r.text)
        assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(url + "/v1/documents", json={"documents": DOCS}, headers=_auth(ADMIN))
    assert r.status_code == 200
    assert httpx.get(url + "/v1/documents/zorbl", headers=_auth(CLIENT)).json()["added_by"] == "admin-0"
    for method, path in (("DELETE", "/v1/documents/zorbl"), ("POST", "/v1/experiments/reload"),
                         ("POST", "/v1/router/reload"), ("GET", "/v1/jobs/x"), ("GET", "/v1/jobs"),
                         ("POST", "/v1/jobs/x/cancel")):
        assert httpx.request(method, url + path, headers=_auth(CLIENT)).status_code == 401, path
    # client endpoints take a client or an admin key, and nothing else
    assert httpx.post(url + "/v1/chat/completions", json=chat).status_code == 401
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=_auth(CLIENT + "x")).status_code == 401
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=_auth(CLIENT)).status_code == 200
    assert httpx.post(url + "/v1/chat/completions", json=chat, headers=_auth(ADMIN)).status_code == 200
    assert httpx.get(url + "/v1/models", headers={"Authorization": CLIENT}).status_code == 401  # no scheme
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [5]})):
        assert httpx.post(url + path, json=body).status_code == 401, path
        assert httpx.post(url + path, json=body, headers=_auth(CLIENT)).status_code == 200, path
    # a wrong key and a missing key look the same
    a = httpx.get(url + "/v1/models").json()
    b = httpx.get(url + "/v1/models", headers=_auth(CLIENT[:-1])).json()
    assert a == b
    # health and metrics stay open for load balancers and Prometheus
    assert httpx.get(url + "/health").status_code == 200 and httpx.get(url + "/metrics").status_code == 200
    # an unauthenticated malformed body learns nothing about the schema
    assert httpx.post(url + "/v1/documents", content=b"{nope").status_code in (400, 401)


def test_keys_file(make_server, tmp_path):
    f = tmp_path / "keys.json"
    f.write_text(json.dumps({"admin": [{"name": "ops", "key": ADMIN}], "clients": [CLIENT]}))
    srv = make_server(keys_file=f)
    r = httpx.post(srv.url + "/v1/documents", json={"documents": DOCS[:1]}, headers=_auth(ADMIN))
    assert r.status_code == 200
    assert httpx.get(srv.url + "/v1/documents/zorbl", headers=_auth(CLIENT)).json()["added_by"] == "ops"


def test_no_admin_key_means_loopback_only(tmp_path):
    from server.api.auth import Keys, KeysError, check_exposure
    from server.config import Settings

    for host in ("0.0.0.0", "192.168.1.5", "::", "example.org"):
        with pytest.raises(ValueError, match="no admin key"):
            check_exposure(Settings(host=host), Keys([], []))
    for host in ("127.0.0.1", "::1", "localhost"):
        check_exposure(Settings(host=host), Keys([], []))
    check_exposure(Settings(host="0.0.0.0", admin_key=ADMIN), Keys.from_settings(Settings(admin_key=ADMIN)))
    with pytest.raises(KeysError, match="shorter than 16"):
        Keys.from_settings(Settings(admin_key="short"))
    # and the command refuses before loading anything
    r = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--host", "0.0.0.0", "--data-dir",
                        str(tmp_path / "d")], capture_output=True, text=True, timeout=120,
                       env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert r.returncode == 2 and "no admin key" in r.stderr


HOSTILE_IDS = ["../escape", "../../etc/passwd", "/etc/passwd", "a/../../b", "..", "C:\\x", "x" * 256, "ünï/cødé",
               "%2e%2e%2fx", "ok id with spaces"]


def test_hostile_document_ids_never_reach_a_path(make_server, tmp_path):
    srv = make_server()
    before = {p for p in tmp_path.rglob("*")}
    for i, doc_id in enumerate(HOSTILE_IDS):
        r = httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": doc_id, "text": f"Fact number {i}."}]})
        assert r.status_code == 200, (doc_id, r.text)
    for bad in ("a\x00b", "x" * 5000, "line\nbreak"):
        r = httpx.post(srv.url + "/v1/documents", json={"documents": [{"id": bad, "text": "t"}]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "documents[0]"
    job = httpx.post(srv.url + "/v1/builds", json={"kind": "kv", "doc_ids": HOSTILE_IDS}).json()
    for _ in range(200):
        job = httpx.get(srv.url + f"/v1/jobs/{job['id']}").json()
        if job["status"] in ("done", "failed"):
            break
        time.sleep(0.05)
    assert job["status"] == "done" and job["errors"] == [] and job["built"] == len(HOSTILE_IDS)
    for doc_id in HOSTILE_IDS:
        q = httpx.get(srv.url + "/v1/documents/" + quote(doc_id, safe="").replace(".", "%2E"))
        assert q.status_code == 200 and q.json()["id"] == doc_id, doc_id
    data = srv.runtime.settings.data_dir.resolve()
    created = {p for p in tmp_path.rglob("*")} - before
    assert created and all(p.resolve().is_relative_to(data) for p in created)
    # artefact files are named by content keys, never by ids
    names = [p.name for p in (data / "kv").iterdir()]
    assert names and all(re.fullmatch(r"[0-9a-f]{16,64}\.safetensors", n) for n in names), names


ALLOWED = re.compile(r".*\.(safetensors|json|sqlite3|sqlite3-wal|sqlite3-shm|faiss|md)$")  # md: the model card peft writes


def test_data_dir_holds_only_inert_formats(make_server):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS, "build": ["kv", "adapters"]}).raise_for_status()
    job_done = False
    for _ in range(600):
        jobs = [httpx.get(srv.url + f"/v1/jobs/{j.id}").json() for j in srv.runtime.jobs._jobs.values()]
        if all(j["status"] in ("done", "failed") for j in jobs):
            job_done = True
            break
        time.sleep(0.1)
    assert job_done
    files = [p for p in srv.runtime.settings.data_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".safetensors" for p in files)
    assert all(ALLOWED.match(p.name) for p in files), [p.name for p in files if not ALLOWED.match(p.name)]


def test_no_code_loading_formats_in_the_source():
    """No pickle and no torch.load without weights_only=True anywhere in the project."""
    offenders = []
    for folder in ("server", "indexes", "adapters", "bench"):
        for py in (ROOT / folder).rglob("*.py"):
            text = py.read_text()
            if re.search(r"^\s*(import pickle|from pickle|import dill|import joblib)", text, re.M):
                offenders.append(f"{py}: pickle")
            for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
                if "weights_only=True" not in m.group(1):
                    offenders.append(f"{py}: {m.group(0)}")
            if "allow_pickle=True" in text:
                offenders.append(f"{py}: allow_pickle")
    assert not offenders


def test_delete_removes_artefacts_unless_shared(make_server):
    srv = make_server()
    twin = {"id": "zorbl-copy", "title": DOCS[0]["title"], "text": DOCS[0]["text"]}
    httpx.post(srv.url + "/v1/documents", json={"documents": [DOCS[0], twin]}).raise_for_status()
    kv = srv.runtime.artefacts.kv
    doc = srv.runtime.kb.store.get("zorbl")
    kv.build_document(doc)
    path = kv.store.path(kv.key(kv._ids(doc)))
    assert path.exists()
    r = httpx.delete(srv.url + "/v1/documents/zorbl").json()
    assert r["deleted"] and r["artefacts_removed"] == [] and path.exists()  # the twin still uses it
    r = httpx.delete(srv.url + "/v1/documents/zorbl-copy").json()
    assert r["artefacts_removed"] == ["kv"] and not path.exists()
    assert not kv.has(doc)


def test_a_damaged_document_store_is_reported_not_served(tmp_path, embedder):
    from indexes import KnowledgeBase
    from indexes.store import Document

    kb = KnowledgeBase(tmp_path / "d", embedder)
    kb.upsert([Document(f"d{i}", f"Document number {i} " * 40) for i in range(60)])
    kb.close()
    db = tmp_path / "d" / "documents.sqlite3"
    raw = bytearray(db.read_bytes())
    for off in range(4096, len(raw), 997):  # scribble over every page after the header
        raw[off:off + 8] = b"\xff" * 8
    db.write_bytes(bytes(raw))
    with pytest.raises((sqlite3.DatabaseError, ValueError), match="documents.sqlite3|malformed|not a database"):
        KnowledgeBase(tmp_path / "d", embedder)


def test_a_damaged_index_file_is_rebuilt_from_the_store(tmp_path, embedder):
    from indexes import KnowledgeBase
    from indexes.store import Document

    kb = KnowledgeBase(tmp_path / "d", embedder)
    kb.upsert([Document("zorbl", DOCS[0]["text"]), Document("paris", DOCS[1]["text"])])
    kb.close()
    idx = tmp_path / "d" / "index.faiss"
    idx.write_bytes(idx.read_bytes()[: len(idx.read_bytes()) // 2])
    kb = KnowledgeBase(tmp_path / "d", embedder)
    assert kb.search("Where does the purple cat live?", 1)[0].doc_id == "zorbl"
    kb.close()
