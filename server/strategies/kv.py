"""`kv`: KV-cache knowledge injection (CAG / TurboRAG style, with an APE-style shared prefix).

Retrieve the top-k passages as `rag` does, lay them out identically (server.prompt),
but instead of prefilling them, inject each passage's stored KV cache (computed once,
after the fixed head, at positions len(head)..) with its keys re-rotated to its place
in the joined sequence: for passage i at offset o_i, k' = R(o_i - len(head)) k, where
R(d) is RoPE's rotation by d positions. Only the question (the layout's tail) is
prefilled. A passage with no stored cache is computed now and stored (reported in
``knowmux.kv.built_now``); with ``"on_missing": "skip"`` it is left out, with
``"on_missing": "error"`` the request is refused (409).

What the joined cache lacks is attention between passages (the head and the first
passage are exact). ``kv_recompute`` (a fraction, default the server's setting)
recovers it CacheBlend's way: the tokens whose layer-1 KV deviates most from a true
prefill are recomputed through all layers (server.engine.model.LlamaRunner.blend); on
the torch engine only.

On the vllm engine the joined prefix is written into vLLM's paged cache by knowmux's KV
connector (server.engine.vllm_kv) and the whole prompt is handed to vLLM, which prefills
only the question; ``knowmux.kv.engine_load`` says how many tokens were written, or why
the load fell back to prefilling the passages.
"""

from __future__ import annotations

import time

from ..engine.types import RowSpec
from ..errors import InvalidRequest, StrategyUnavailable
from .base import Plan, Query, Strategy, StrategyContext
from .rag import retrieve


class KV(Strategy):
    name = "kv"
    needs_documents = True
    requires = frozenset({"kv"})

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        if ctx.kv is None:
            raise StrategyUnavailable("the kv strategy needs a data folder for its KV store")
        fraction = query.options.get("kv_recompute")
        if fraction is not None and fraction > 0 and not ctx.kv.can_blend:
            raise InvalidRequest("kv_recompute (CacheBlend) runs on the torch engine only; "
                                 "on the vllm engine kv injects the joined caches as they are", param="kv_recompute")
        fraction = ctx.kv_recompute if fraction is None else fraction  # in [0, 1]: protocol, Settings
        if not ctx.kv.can_blend:
            fraction = 0.0  # the server's default does not apply where CacheBlend cannot run (startup says so)
        retrieved, passages, ms = retrieve(query, ctx)
        layout = ctx.prompts.with_passages(query.messages, passages)
        t0 = time.perf_counter()
        on_missing = query.options.get("on_missing", "build")
        found = [ctx.kv.passage(p.doc_id, ids, build=on_missing == "build") for p, ids in zip(passages, layout.passages)]
        missing = [p.doc_id for p, f in zip(passages, found) if f is None]
        if missing and on_missing == "error":
            raise StrategyUnavailable(f"no stored KV cache for {', '.join(missing)} (on_missing: error); "
                                      f"build them with knowmux ingest --build kv", param="on_missing")
        kept = [(p, ids, f) for p, ids, f in zip(passages, layout.passages, found) if f is not None]
        retrieved = [r for r in retrieved if r.doc_id not in missing]
        ids = layout.head + [t for _, pids, _ in kept for t in pids]
        prefix = ctx.kv.join([f.entry for _, _, f in kept], ids)
        load_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        exact = len(layout.head) + (len(kept[0][1]) if kept else 0)  # the head and the first passage
        prefix, recomputed = ctx.kv.blend(prefix, ids, exact, fraction)
        blend_ms = (time.perf_counter() - t1) * 1e3
        info = {"kv": {"injected_tokens": prefix.length, "prefilled_tokens": len(layout.tail),
                       "recompute_fraction": fraction, "recomputed_tokens": recomputed,
                       "sources": {p.doc_id: f.source for p, _, f in kept},
                       "built_now": [p.doc_id for p, _, f in kept if f.source == "built"], "missing": missing}}
        # an engine that writes the prefix into its own cache (vllm) says how that went
        report = (lambda: {"kv": {**info["kv"], "engine_load": dict(prefix.load)}}) if ctx.kv.engine_loads else None
        return Plan(self.name, [RowSpec(layout.tail, prefix=prefix)], retrieved,
                    timings_ms={"retrieve": ms, "kv_load": load_ms, "kv_blend": blend_ms}, info=info,
                    report=report)
