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
prefill are recomputed through all layers (server.engine.blend.cacheblend).
``kv_link_tokens`` (a count, default the server's setting) recomputes instead the first
N tokens of every passage after the first through all layers against the joined cache
(EPIC's LegoLink: independent encoding makes each passage's first tokens attention
sinks; recomputed, they see the passages before them). APE (server.engine.ape) changes
the attention instead: ``kv_temperature`` T and ``kv_scale`` S reweight the question's and
answer's attention to the passages (their logits a/T, their block's mass S(sum e^{a/T})^T),
and ``kv_positions: parallel`` leaves every passage at the positions it was encoded at,
right after the head, with the question after the longest (APE's layout; not combinable
with the two recomputes). All of these run on the torch engine only.

On the vllm engine the joined prefix is written into vLLM's paged cache by knowmux's KV
connector (server.engine.vllm_kv) and the whole prompt is handed to vLLM, which prefills
only the question; ``knowmux.kv.engine_load`` says how many tokens were written, or why
the load fell back to prefilling the passages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..engine.types import RowSpec
from ..errors import InvalidRequest, StrategyUnavailable
from ..options import KV_OPTIONS
from .base import Plan, Query, Strategy, StrategyContext
from .rag import retrieve


class KV(Strategy):
    name = "kv"
    needs_documents = True
    requires = frozenset({"kv"})

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        if ctx.kv is None:
            raise StrategyUnavailable("the kv strategy needs a data folder for its KV store")
        opt = KVOptions.of(query, ctx)
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
        prefix = ctx.kv.join([f.entry for _, _, f in kept], ids, parallel=opt.positions == "parallel")
        load_ms = (time.perf_counter() - t0) * 1e3
        t1 = time.perf_counter()
        exact = len(layout.head) + (len(kept[0][1]) if kept else 0)  # the head and the first passage
        starts, pos = [], exact
        for _, pids, _ in kept[1:]:  # LegoLink: the first `link` tokens of every passage after the first
            starts += range(pos, pos + min(opt.link_tokens, len(pids)))
            pos += len(pids)
        prefix, linked = ctx.kv.link(prefix, ids, starts)
        prefix, recomputed = ctx.kv.blend(prefix, ids, exact, opt.recompute)
        if opt.ape:
            prefix = ctx.kv.ape(prefix, len(layout.head), opt.positions == "parallel", opt.temperature, opt.scale,
                                [len(pids) for _, pids, _ in kept])
        blend_ms = (time.perf_counter() - t1) * 1e3
        info = {"kv": {"injected_tokens": prefix.length, "prefilled_tokens": len(layout.tail),
                       "recompute_fraction": opt.recompute, "recomputed_tokens": recomputed,
                       "link_tokens": opt.link_tokens, "linked_tokens": linked, "positions": opt.positions,
                       "temperature": opt.temperature, "scale": opt.scale,
                       "sources": {p.doc_id: f.source for p, _, f in kept},
                       "built_now": [p.doc_id for p, _, f in kept if f.source == "built"], "missing": missing}}
        # an engine that writes the prefix into its own cache (vllm) says how that went
        report = (lambda: {"kv": {**info["kv"], "engine_load": dict(prefix.load)}}) if ctx.kv.engine_loads else None
        return Plan(self.name, [RowSpec(layout.tail, prefix=prefix)], retrieved,
                    timings_ms={"retrieve": ms, "kv_load": load_ms, "kv_blend": blend_ms}, info=info,
                    report=report)


@dataclass(frozen=True)
class KVOptions:
    """A request's `kv` options, each the request's value else the server's default (ranges
    checked at the wire and by Settings)."""

    recompute: float = 0.0  # CacheBlend: fraction of the non-exact passage tokens recomputed
    link_tokens: int = 0  # LegoLink: first tokens of each passage after the first recomputed
    positions: str = "sequential"  # APE: "parallel" keeps every passage where it was encoded
    temperature: float = 1.0  # APE: attention temperature over the passages
    scale: float = 1.0  # APE: attention scale over the passages

    @property
    def ape(self) -> bool:
        return self.positions == "parallel" or self.temperature != 1.0 or self.scale != 1.0

    @classmethod
    def of(cls, query: Query, ctx: StrategyContext) -> "KVOptions":
        """Every option that changes the joined cache or the attention over it needs the
        torch engine (a forward over chosen tokens, or APE's attention): asking for one on
        vllm is a 400 naming the field, and the server's defaults do not apply there. APE's
        parallel positions leave the passages where no recompute can see them in order:
        combining them with a recompute is a 400 too."""
        asked = {k: query.options[k] for k in KV_OPTIONS if query.options.get(k) is not None}
        if not ctx.kv.can_blend:
            for name, value in asked.items():
                if value != getattr(cls, _FIELDS[name]):
                    raise InvalidRequest(f"{name} changes the joined cache or the attention over it, which runs on "
                                         "the torch engine only; on the vllm engine kv injects the joined caches as "
                                         "they are", param=name)
            return cls()
        chosen = cls(**{_FIELDS[k]: asked.get(k, ctx.kv_defaults.get(k, getattr(cls, _FIELDS[k]))) for k in KV_OPTIONS})
        if chosen.positions == "parallel" and (chosen.recompute or chosen.link_tokens):
            raise InvalidRequest("kv_positions: parallel cannot be combined with kv_recompute or kv_link_tokens "
                                 "(they recompute passages in sequence)", param="kv_positions")
        return chosen


_FIELDS = {"kv_recompute": "recompute", "kv_link_tokens": "link_tokens", "kv_positions": "positions",
           "kv_temperature": "temperature", "kv_scale": "scale"}
