"""The KV store at real-model sizes: bytes per token, write and load times per passage
from each tier, and eviction under a disk budget. Random tensors of a model's KV shape
(the store never looks inside them), so no 8B model is needed.

    python -m bench.kv_store --shape llama3-8b --dtype bfloat16 --passages 40 --budget-passages 10
    python -m bench.kv_store --shape smollm2 --dtype float32

Per passage of --tokens tokens: ``put`` (checksum, serialise, atomic write, tier copy);
a load from local disk with the file's pages dropped from the OS page cache first
(``posix_fadvise(DONTNEED)``: a cold read) and with them cached (warm); a memory hit; a
fetch from the second tier (a directory on the same disk here; an object store adds its
network time). Then the disk budget: how many files and bytes remain after writing
--passages passages under a budget of --budget-passages.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.metrics import percentile

SHAPES = {  # layers, KV heads, head dim
    "llama3-8b": (32, 8, 128),
    "smollm2": (30, 3, 64),
    "qwen2-7b": (28, 4, 128),
}


def drop_from_page_cache(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def ms(xs: list[float]) -> dict:
    return {"p50_ms": round(percentile(xs, 50) * 1e3, 3), "p95_ms": round(percentile(xs, 95) * 1e3, 3)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama3-8b")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="bfloat16")
    ap.add_argument("--tokens", type=int, default=122, help="tokens per passage (NQ-open's passages: 122 on average)")
    ap.add_argument("--passages", type=int, default=40)
    ap.add_argument("--budget-passages", type=int, default=10)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args(argv)
    from server.kv.store import KVEntry, KVStore
    from server.tiers import DirectoryTier

    L, H, D = SHAPES[a.shape]
    dtype = getattr(torch, a.dtype)
    shape = (L, 2, H, a.tokens, D)
    per_token = L * 2 * H * D * torch.empty(0, dtype=dtype).element_size()
    g = torch.Generator().manual_seed(0)
    with tempfile.TemporaryDirectory(dir=os.environ.get("KNOWMUX_BENCH_TMP")) as d:
        d = Path(d)
        tier = DirectoryTier(d / "shared")
        store = KVStore(d / "a", memory_bytes=1 << 40, tier=tier)
        puts, cold, warm, mem, fetch = [], [], [], [], []
        keys = []
        for i in range(a.passages):
            kv = torch.randn(shape, generator=g).to(dtype)
            key = f"p{i:04d}"
            t0 = time.perf_counter()
            size = store.put(KVEntry(key, kv, 0, key), {"shape": a.shape})
            puts.append(time.perf_counter() - t0)
            keys.append(key)
        for key in keys:
            store.forget_memory()
            drop_from_page_cache(store.path(key))
            t0 = time.perf_counter()
            _, where = store.get(key, dtype)
            cold.append(time.perf_counter() - t0)
            assert where == "disk", where
            store.forget_memory()
            t0 = time.perf_counter()
            _, where = store.get(key, dtype)
            warm.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            _, where = store.get(key, dtype)
            mem.append(time.perf_counter() - t0)
            assert where == "memory"
        other = KVStore(d / "b", memory_bytes=0, tier=tier)
        for key in keys:
            drop_from_page_cache(tier.root / f"{key}.safetensors")
            t0 = time.perf_counter()
            _, where = other.get(key, dtype)
            fetch.append(time.perf_counter() - t0)
            assert where == "tier", where
        budget = a.budget_passages * size
        small = KVStore(d / "c", memory_bytes=0, disk_bytes=budget)
        for i in range(a.passages):
            small.put(KVEntry(f"q{i:04d}", torch.randn(shape, generator=g).to(dtype), 0), {})
            if i >= 2:
                small.get(f"q{i - 2:04d}")  # a reader keeps recent ones warm
        info = small.info()
        on_disk = sorted(p.stem for p in (d / "c").glob("*.safetensors"))
    result = {
        "command": "python -m bench.kv_store " + " ".join(argv if argv is not None else os.sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "shape": {"name": a.shape, "layers": L, "kv_heads": H, "head_dim": D, "dtype": a.dtype},
        "tokens_per_passage": a.tokens, "bytes_per_token": per_token, "file_bytes_per_passage": size,
        "put": ms(puts), "disk_cold": ms(cold), "disk_warm": ms(warm),
        "memory": {"p50_us": round(percentile(mem, 50) * 1e6, 1), "p95_us": round(percentile(mem, 95) * 1e6, 1)},
        "tier_fetch": ms(fetch),
        "cold_read_gb_per_s": round(size / statistics.median(cold) / 1e9, 2),
        "eviction": {"budget_bytes": budget, "written": a.passages, "kept_files": info["disk_files"],
                     "kept_bytes": info["disk_bytes"], "evicted": info["evicted"],
                     "within_budget": info["disk_bytes"] <= budget, "kept": on_disk},
    }
    print(f"{a.shape} {a.dtype}: {per_token / 1024:.1f} KiB per token, {size / 1e6:.1f} MB per {a.tokens}-token passage")
    print(f"put p50 {result['put']['p50_ms']} ms; load from disk cold p50 {result['disk_cold']['p50_ms']} ms "
          f"(p95 {result['disk_cold']['p95_ms']}), warm p50 {result['disk_warm']['p50_ms']} ms "
          f"(p95 {result['disk_warm']['p95_ms']}); memory p50 {result['memory']['p50_us']} us; "
          f"second-tier fetch p50 {result['tier_fetch']['p50_ms']} ms (p95 {result['tier_fetch']['p95_ms']})")
    e = result["eviction"]
    print(f"budget {a.budget_passages} passages ({budget / 1e6:.0f} MB): after {a.passages} writes {e['kept_files']} "
          f"files, {e['kept_bytes'] / 1e6:.0f} MB kept, {e['evicted']} evicted (least recently used first)")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
