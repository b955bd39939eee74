"""The KV store's tiers: dtype-native entries, the disk budget's LRU eviction, readers
racing eviction, and the shared second tier (a directory; an S3-compatible server)."""

import random
import socket
import threading

import pytest
import torch

from server.kv.store import KVEntry, KVStore
from server.tiers import DirectoryTier, open_tier


def entry(i: int, dtype=torch.float32, tokens: int = 10) -> KVEntry:
    g = torch.Generator().manual_seed(i)
    return KVEntry(f"k{i}", torch.randn(1, 2, 1, tokens, 16, generator=g).to(dtype), 5, f"doc{i}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_entry_comes_back_from_disk_in_its_own_dtype_bit_for_bit(tmp_path, dtype):
    store = KVStore(tmp_path)
    e = entry(1, dtype)
    store.put(e, {"dtype": str(dtype)})
    store.forget_memory()
    got, where = store.get("k1", dtype)
    assert where == "disk" and got.kv.dtype == dtype and got.start_pos == 5 and got.doc_id == "doc1"
    assert torch.equal(got.kv.view(torch.uint8), e.kv.view(torch.uint8))
    assert store.get("k1", dtype)[1] == "memory"


def test_an_entry_of_another_dtype_is_refused(tmp_path):
    store = KVStore(tmp_path)
    store.put(entry(1, torch.bfloat16), {})
    assert store.get("k1", torch.float32) == (None, "corrupt")  # from memory
    store.forget_memory()
    assert store.get("k1", torch.float32) == (None, "corrupt")  # from disk
    assert store.get("k1", torch.bfloat16)[1] == "disk"


def test_the_disk_budget_evicts_the_least_recently_used_files(tmp_path):
    size = KVStore(tmp_path / "probe").put(entry(0), {})
    store = KVStore(tmp_path / "kv", memory_bytes=0, disk_bytes=3 * size + size // 2)  # room for three
    for i in range(3):
        store.put(entry(i), {})
    assert store.get("k0")[1] == "disk"  # k0 is now the most recently used
    store.put(entry(3), {})  # over budget: k1, the least recently used, goes
    assert sorted(p.stem for p in (tmp_path / "kv").glob("*.safetensors")) == ["k0", "k2", "k3"]
    assert store.get("k1") == (None, "missing") and store.evicted == 1
    info = store.info()
    assert info["disk_files"] == 3 and info["disk_bytes"] <= info["disk_budget"]
    # the order survives a restart (file times): a new process evicts k2 next
    again = KVStore(tmp_path / "kv", memory_bytes=0, disk_bytes=3 * size + size // 2)
    again.put(entry(4), {})
    assert sorted(p.stem for p in (tmp_path / "kv").glob("*.safetensors")) == ["k0", "k3", "k4"]


def test_a_reader_racing_eviction_gets_a_whole_entry_or_a_miss(tmp_path):
    size = KVStore(tmp_path / "probe").put(entry(0, tokens=200), {})
    store = KVStore(tmp_path / "kv", memory_bytes=0, disk_bytes=4 * size)
    expected = {}
    for i in range(40):
        expected[f"k{i}"] = entry(i, tokens=200).kv
    seen, stop = [], threading.Event()

    def read():
        rng = random.Random(0)
        while not stop.is_set():
            key = f"k{rng.randrange(40)}"
            got, where = store.get(key)
            seen.append(where)
            if got is not None:
                assert torch.equal(got.kv, expected[key])

    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers:
        t.start()
    for i in range(40):
        store.put(entry(i, tokens=200), {})
    stop.set()
    for t in readers:
        t.join()
    assert "corrupt" not in seen and "disk" in seen
    assert len(list((tmp_path / "kv").glob("*.safetensors"))) <= 4


def test_a_shared_directory_tier_serves_a_cache_built_by_another_replica(tmp_path):
    shared = open_tier((tmp_path / "shared").as_uri(), "kv")
    a, b = KVStore(tmp_path / "a", tier=shared), KVStore(tmp_path / "b", tier=open_tier(str(tmp_path / "shared"), "kv"))
    e = entry(7, torch.bfloat16)
    a.put(e, {})
    assert b.contains("k7")
    got, where = b.get("k7", torch.bfloat16)
    assert where == "tier" and torch.equal(got.kv.view(torch.uint8), e.kv.view(torch.uint8))
    assert (tmp_path / "b" / "k7.safetensors").exists()  # kept locally
    b.forget_memory()
    assert b.get("k7")[1] == "disk"
    assert b.remove("k7") and not shared.exists("k7.safetensors") and a.get("k7")[1] == "memory"


def test_a_damaged_object_in_the_tier_is_refused_and_not_kept(tmp_path):
    tier = DirectoryTier(tmp_path / "shared")
    KVStore(tmp_path / "a", tier=tier).put(entry(3), {})
    raw = bytearray(tier.get("k3.safetensors"))
    raw[-8:] = b"\x00" * 8
    tier.put("k3.safetensors", bytes(raw))
    b = KVStore(tmp_path / "b", tier=tier)
    assert b.get("k3") == (None, "corrupt")
    assert not (tmp_path / "b" / "k3.safetensors").exists()


def test_an_unreachable_tier_is_a_miss_not_an_error(tmp_path):
    from tests.conftest import UnreachableTier

    store = KVStore(tmp_path, tier=UnreachableTier())
    assert store.get("k1") == (None, "missing") and not store.contains("k1")
    store.put(entry(1), {})  # stored locally; the tier's failure is logged
    store.forget_memory()
    assert store.get("k1")[1] == "disk"


@pytest.mark.parametrize("url", ["http://x/y", "s3://", "file://host/dir", "s3://b/p?colour=blue"])
def test_tier_urls_it_cannot_serve_are_refused(url):
    with pytest.raises(ValueError):
        open_tier(url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_server(monkeypatch, tmp_path):
    """A local S3-compatible server (moto's, from PyPI) on loopback with one bucket. In a
    child process: moto's server imports flask, whose context proxies break vLLM's start
    when they sit in the same process's modules (tests/test_vllm.py runs later)."""
    import importlib.util
    import subprocess
    import sys
    import time

    if importlib.util.find_spec("moto") is None or importlib.util.find_spec("flask") is None:
        pytest.fail("moto[server] is not installed (make test installs it): the S3 tier would go untested")
    import boto3
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    port = _free_port()
    log = open(tmp_path / "moto.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=url)
    try:
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket="knowmux")
                break
            except Exception:
                if time.time() > deadline or proc.poll() is not None:
                    raise
                time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()


def test_an_s3_tier_round_trips_and_refuses_a_damaged_object(tmp_path, s3_server):
    url = f"s3://knowmux/team-a?endpoint_url={s3_server}&region=us-east-1"
    a, b = KVStore(tmp_path / "a", tier=open_tier(url, "kv")), KVStore(tmp_path / "b", tier=open_tier(url, "kv"))
    e = entry(5, torch.float16)
    a.put(e, {})
    got, where = b.get("k5", torch.float16)
    assert where == "tier" and torch.equal(got.kv.view(torch.uint8), e.kv.view(torch.uint8))
    tier = open_tier(url, "kv")
    raw = bytearray(tier.get("k5.safetensors"))
    raw[-4:] = b"\xff" * 4
    tier.put("k5.safetensors", bytes(raw))
    c = KVStore(tmp_path / "c", tier=tier)
    assert c.get("k5") == (None, "corrupt")
    assert c.remove("k5") and not tier.exists("k5.safetensors")
