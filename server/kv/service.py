"""Building, loading and joining per-passage KV caches (the `kv` strategy's engine room).

Layout (server.prompt): [head][passage 1]...[passage k][tail]. The head (template +
system prompt) is the same for every request: its KV is computed once. Each passage's
KV is computed once *after the head* (so it saw the shared prefix, as APE does) at
positions len(head).., stored, and at query time re-rotated to its place in the joined
sequence (TurboRAG's reordered positions). Only the tail (the question) is prefilled.
What the joined cache lacks against a full prefill is attention between passages;
the first passage after the head is exact.

The model work (spans, moving keys) is the engine's room (server.kv.compute): on the
torch engine it runs on the engine thread between steps; on vLLM a span is a one-token
vLLM request read out of its cache, and injection is the connector's. A recompute of
joined tokens (CacheBlend, LegoLink) is planned here and runs inside the torch engine's
step with the row's first chunk (server.engine.recompute).
"""

from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, replace
from typing import Optional

import torch

from ..engine.ape import ParallelContext
from ..engine.kvcache import KVPrefix
from ..engine.recompute import Recompute, plan as plan_recompute
from ..engine.device import dtype_name
from ..prompt import Passage
from .store import KVEntry, KVStore, entry_key


@dataclass(frozen=True)
class PassageKV:
    entry: KVEntry
    source: str  # "memory" | "disk" | "built"


class KVService:
    def __init__(self, engine, prompts, store: KVStore, compute=None):
        from .compute import kv_compute

        self.engine, self.prompts, self.store = engine, prompts, store
        self.compute = compute if compute is not None else kv_compute(engine)
        self.fingerprint = self.compute.fingerprint
        self.torch_dtype = self.compute.dtype
        self.dtype = dtype_name(self.torch_dtype)
        self.engine_loads = self.compute.engine_loads  # the engine writes the prefix itself and reports it
        self.can_blend = self.compute.can_blend
        self._head: Optional[tuple[list[int], KVPrefix]] = None
        # (doc id, content hash) -> store key: the router asks `has` for every hit of every
        # `auto` request, and the key needs the passage tokenised
        self._doc_keys: collections.OrderedDict[tuple[str, str], str] = collections.OrderedDict()
        self._keys_lock = threading.Lock()

    # ---- public -------------------------------------------------------------------
    def head(self) -> tuple[list[int], KVPrefix]:
        ids = self.prompts.layout_head()
        if self._head is None or self._head[0] != ids:
            self._head = (ids, self.compute.span(None, [], ids))
            self._doc_keys.clear()
        return self._head

    def key(self, passage_ids: list[int]) -> str:
        return entry_key(self.fingerprint, self.dtype, self.head()[0], passage_ids)

    def passage(self, doc_id: str, passage_ids: list[int], build: bool = True,
                background: bool = False) -> Optional[PassageKV]:
        """The stored cache of one passage; computed and stored now if missing and ``build``
        (as background work that yields to live requests if ``background``: a build job)."""
        head_ids, head_kv = self.head()
        key = self.key(passage_ids)
        entry, where = self.store.get(key, self.torch_dtype)
        if entry is not None:
            return PassageKV(entry, where)
        if not build:
            return None
        kv = self.compute.span(head_kv, head_ids, passage_ids, background)
        entry = KVEntry(key, kv.kv.cpu(), kv.start_pos, doc_id)  # the store's tiers hold host memory
        self.store.put(entry, {"model": self.fingerprint, "dtype": self.dtype, "n_tokens": len(passage_ids),
                               "head_tokens": len(head_ids), "built_at": time.time()})
        return PassageKV(entry, "built")

    def join(self, entries: list[KVEntry], ids: Optional[list[int]] = None, parallel: bool = False) -> KVPrefix:
        """Head + passages in order: one prefix [L, 2, Hkv, len(head) + sum(n_i), D] whose next
        token sits at position len(head) + sum(n_i) (``ids``: its tokens).

        Sequential (TurboRAG): each passage's keys are moved to its place after the one
        before. ``parallel`` (APE): every passage where it was encoded, right after the
        head, and what follows after the longest. RoPE attention depends only on the
        distance between a query and a key, so that layout is written as its shift by
        d = sum(n_i) - max(n_i): head keys at d.., every passage at d + len(head).., and the
        row's own tokens where they fall anyway, so both engines serve it unchanged."""
        _, head_kv = self.head()
        lengths = [e.n_tokens for e in entries]
        shift = sum(lengths) - max(lengths, default=0) if parallel else 0

        def join() -> KVPrefix:  # megabytes of rotation and copying: torch work, on the engine's thread
            parts, pos = [self.compute.rotate(head_kv.kv, shift) if shift else head_kv.kv], head_kv.length
            for e in entries:
                parts.append(self.compute.rotate(e.kv, pos + shift - e.start_pos))
                pos += 0 if parallel else e.n_tokens
            return KVPrefix(torch.cat(parts, dim=3), 0, tuple(ids) if ids is not None else None,
                            layout="parallel" if parallel else "sequential")

        return self.compute.run(join)

    def doc_key(self, doc) -> str:
        memo = (doc.id, doc.content_hash)
        with self._keys_lock:  # requests are planned on several threads
            key = self._doc_keys.get(memo)
            if key is not None:
                self._doc_keys.move_to_end(memo)
                return key
        key = self.key(self._ids(doc))
        with self._keys_lock:
            self._doc_keys[memo] = key
            if len(self._doc_keys) > 65536:
                self._doc_keys.popitem(last=False)
        return key

    def _ids(self, doc) -> list[int]:
        return self.prompts.passage_ids(Passage(doc.id, doc.title, doc.text))

    def forget(self, doc) -> bool:
        """Remove the document's stored cache (its content is no longer in the store)."""
        return self.store.remove(self.doc_key(doc))

    def has(self, doc) -> bool:
        """Whether the document's cache is stored (memory or disk), without loading it."""
        return self.store.contains(self.doc_key(doc))

    def build_document(self, doc) -> bool:
        """Compute and store one document's cache unless stored; True if it was built now.
        A build job's prefills are background work: while requests run, one per
        ``KNOWMUX_BUILD_YIELD_S`` (each one held the engine for a passage's prefill between
        two steps: a 150-document build made live serving 2.8x slower)."""
        return self.passage(doc.id, self._ids(doc), background=True).source == "built"

    def recompute(self, ids: list[int], exact_upto: int, fraction: float, link: list[int],
                  refresh: bool = False) -> Optional[Recompute]:
        """What of a joined prefix (tokens ``ids``, the first ``exact_upto`` exact) the row's
        first step recomputes: the ``link`` positions (LegoLink) and ``fraction`` of the other
        non-exact tokens by deviation (CacheBlend; ``refresh``: chosen again layer by layer);
        None for nothing. Only a plan: the engine runs it in the step (server.engine.recompute)."""
        return plan_recompute(ids, exact_upto, fraction, link, refresh, self.compute.shape[0])

    @staticmethod
    def ape(prefix: KVPrefix, head: int, temperature: float, scale: float) -> KVPrefix:
        """The joined prefix marked for APE's attention (server.engine.ape) over its passages,
        slots ``head``.. of it."""
        return replace(prefix, parallel=ParallelContext(head, prefix.length, temperature, scale))

    def describe(self, doc) -> dict:
        doc_id, passage_ids = doc.id, self._ids(doc)
        key = self.key(passage_ids)
        entry, where = self.store.get(key)
        (L, H, D), n = self.compute.shape, len(passage_ids)
        bytes_per_token = L * 2 * H * D * self.torch_dtype.itemsize
        return {"doc_id": doc_id, "key": key, "stored": entry is not None, "where": where,
                "shape": [L, 2, H, n, D], "dtype": self.dtype, "tokens": n,
                "bytes": n * bytes_per_token, "bytes_per_token": bytes_per_token,
                "file": self.store.path(key).name}
