"""Stored KV caches: bytes per document and load time from disk and from the memory LRU.

    python -m bench.kv_load --data-dir runs/nq-data [--n 50]

Reads the caches a bench run stored (DATA_DIR/kv/*.safetensors) through the KV store:
a disk load (memory LRU emptied first; the OS page cache may still hold the file, as it
would on a serving machine), then a memory hit. Includes the checksum verification.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from bench.metrics import percentile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--n", type=int, default=50)
    a = ap.parse_args()
    from server.kv.store import KVStore

    store = KVStore(a.data_dir / "kv")
    keys = sorted(p.stem for p in (a.data_dir / "kv").glob("*.safetensors"))[: a.n]
    if not keys:
        raise SystemExit(f"no stored KV caches under {a.data_dir / 'kv'}")
    disk, mem, sizes, tokens = [], [], [], []
    for key in keys:
        store.forget_memory()
        t0 = time.perf_counter()
        entry, where = store.get(key)
        disk.append(time.perf_counter() - t0)
        assert where == "disk", where
        t0 = time.perf_counter()
        _, where = store.get(key)
        mem.append(time.perf_counter() - t0)
        assert where == "memory"
        sizes.append(store.path(key).stat().st_size)
        tokens.append(entry.n_tokens)
    print(f"{len(keys)} caches: {statistics.mean(tokens):.0f} tokens and {statistics.mean(sizes) / 1e6:.2f} MB "
          f"per document on average ({sum(sizes) / sum(tokens) / 1e3:.1f} KB per token)")
    print(f"load from disk: p50 {percentile(disk, 50) * 1e3:.2f} ms, p95 {percentile(disk, 95) * 1e3:.2f} ms; "
          f"from memory: p50 {percentile(mem, 50) * 1e6:.1f} us")


if __name__ == "__main__":
    main()
