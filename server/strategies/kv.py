"""`kv`: KV-cache knowledge injection (CAG / TurboRAG / APE).

Retrieve the top-k passages as `rag` does, lay them out identically (server.prompt),
but instead of prefilling them, inject each passage's stored KV cache (computed once,
after the fixed head, at positions len(head)..) and prefill only the question (the
layout's tail). A passage with no stored cache is computed now and stored (reported in
``knowmux.kv.built_now``); with ``"on_missing": "skip"`` it is left out, with
``"on_missing": "error"`` the request is refused (409).

Where the passages sit (``kv_positions``): ``parallel`` (the default, APE's layout) keeps
every passage where it was encoded, right after the head, and puts the question after
the longest, so that each passage sits next to the question as when it was encoded
alone; ``sequential`` (TurboRAG's) moves passage i to its offset o_i in the rag layout,
k' = R(o_i - len(head)) k with R(d) RoPE's rotation by d. Both are rotations of the
stored keys when they are joined (server.kv.service), on either engine. Measured on
NQ-open at top-3 (bench/RESULTS.md): parallel 20.0% containment, sequential 15.0%, rag
21.0%, at the same time to first token.

What the joined cache lacks is attention between passages (the head and the first
passage are exact). ``kv_recompute`` (a fraction) recovers it CacheBlend's way: the
tokens whose layer-1 KV deviates most from a true prefill are recomputed through all
layers; with ``kv_recompute_refresh`` they are chosen again at every layer among those
still carried (CacheBlend's gradual filtering). ``kv_link_tokens`` (a count) recomputes
the first N tokens of every passage after the first through all layers against the
joined cache (EPIC's LegoLink: independent encoding makes each passage's first tokens
attention sinks; recomputed, they see the passages before them). Both run in the row's
first step beside the step's other rows (server.engine.recompute), and both see
passages in sequence (sequential positions). APE's ``kv_temperature`` T and
``kv_scale`` S reweight the question's and answer's attention to the passages (their
logits a/T, their block's mass S(sum e^{a/T})^T; server.engine.ape); with parallel
positions and two passages or more T defaults to APE_TEMPERATURE (0.8: at top-10 on
NQ-open 16.0% containment against 9.0% at T = 1 and rag's 15.0%). All but the positions
run on the torch engine only; each defaults to the server's setting.

On the vllm engine the joined prefix is written into vLLM's paged cache by knowmux's KV
connector (server.engine.vllm_kv) and the whole prompt is handed to vLLM, which prefills
only the question; ``knowmux.kv.engine_load`` says how many tokens were written, or why
the load fell back to prefilling the passages.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

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
        exact = len(layout.head) + (len(kept[0][1]) if kept else 0)  # the head and the first passage
        starts, pos = [], exact
        for _, pids, _ in kept[1:]:  # LegoLink: the first `link` tokens of every passage after the first
            starts += range(pos, pos + min(opt.link_tokens, len(pids)))
            pos += len(pids)
        # recomputed in the row's first step, with the other rows of that step (server.engine.recompute)
        # (on an engine that cannot run them, KVOptions.of left both at 0: no recompute)
        recompute = ctx.kv.recompute(ids, exact, opt.recompute, starts, opt.refresh)
        linked = len(starts)
        recomputed = recompute.tokens - linked if recompute is not None else 0
        temperature = opt.attention_temperature(len(kept), ctx.kv.can_blend)
        if temperature != 1.0 or opt.scale != 1.0:
            prefix = ctx.kv.ape(prefix, len(layout.head), temperature, opt.scale)
        load_ms = (time.perf_counter() - t0) * 1e3
        info = {"kv": {"injected_tokens": prefix.length, "prefilled_tokens": len(layout.tail),
                       "recompute_fraction": opt.recompute, "recomputed_tokens": recomputed,
                       "recompute_refresh": opt.refresh,
                       "link_tokens": opt.link_tokens, "linked_tokens": linked, "positions": opt.positions,
                       "temperature": temperature, "scale": opt.scale,
                       "sources": {p.doc_id: f.source for p, _, f in kept},
                       "built_now": [p.doc_id for p, _, f in kept if f.source == "built"], "missing": missing}}
        # an engine that writes the prefix into its own cache (vllm) says how that went
        report = (lambda: {"kv": {**info["kv"], "engine_load": dict(prefix.load)}}) if ctx.kv.engine_loads else None
        return Plan(self.name, [RowSpec(layout.tail, prefix=prefix, recompute=recompute)], retrieved,
                    timings_ms={"retrieve": ms, "kv_load": load_ms}, info=info,
                    report=report)


@dataclass(frozen=True)
class KVOptions:
    """A request's `kv` options, each the request's value else the server's setting (ranges
    checked at the wire and by Settings)."""

    recompute: float = 0.0  # CacheBlend: fraction of the non-exact passage tokens recomputed
    refresh: bool = False  # CacheBlend: the tokens chosen again at every layer (gradual filtering)
    link_tokens: int = 0  # LegoLink: first tokens of each passage after the first recomputed
    positions: str = "parallel"  # APE's positions; "sequential": TurboRAG's (each after the one before)
    temperature: Optional[float] = None  # APE: attention temperature over the passages (None: see below)
    scale: float = 1.0  # APE: attention scale over the passages

    @classmethod
    def of(cls, query: Query, ctx: StrategyContext) -> "KVOptions":
        """The recomputes need a forward over chosen tokens and APE's T and S an attention of
        knowmux's own: torch engine only. Asking for one on vllm is a 400 naming the field,
        and the server's settings for them do not apply there (positions do: they are a
        rotation of the stored keys). The recomputes see passages in sequence, so they and
        parallel positions exclude each other: what the request asks for wins over the
        server's settings, and a request asking for both is a 400."""
        settings = {k: v for k, v in ctx.kv_defaults.items() if v is not None}
        if not ctx.kv.can_blend:
            for name in TORCH_ONLY:
                value = query.options.get(name)
                if value is not None and value != TORCH_ONLY[name]:
                    raise InvalidRequest(f"{name} recomputes joined tokens or reweights the attention to them, which "
                                         "runs on the torch engine only", param=name)
                settings.pop(name, None)
        asked = {k for k, v in query.options.items() if k in _FIELDS and v is not None}
        chosen = {_FIELDS[k]: v for k, v in {**settings, **query.options}.items() if k in _FIELDS and v is not None}
        if (chosen.get("recompute") or chosen.get("link_tokens")) and chosen.get("positions", "parallel") == "parallel":
            if "kv_positions" not in asked:
                chosen["positions"] = "sequential"
            elif asked & {"kv_recompute", "kv_link_tokens"}:
                raise InvalidRequest("kv_positions: parallel cannot be combined with kv_recompute or kv_link_tokens "
                                     "(they recompute passages in sequence)", param="kv_positions")
            else:  # the request's positions over the server's recompute
                chosen["recompute"], chosen["link_tokens"] = 0.0, 0
        return cls(**chosen)

    def attention_temperature(self, passages: int, engine_reweights: bool) -> float:
        """T as asked for, else APE_TEMPERATURE where APE's attention applies (parallel
        positions, two passages or more: one passage joined is exact, so `kv` at top-1
        stays `rag` at top-1; an engine that runs the reweighting), else 1."""
        if self.temperature is not None:
            return self.temperature
        return APE_TEMPERATURE if self.positions == "parallel" and passages > 1 and engine_reweights else 1.0


# APE's attention temperature by default under its layout: measured on NQ-open at top-10
# (bench/RESULTS.md) 16.0% containment against 9.0% at T = 1 and rag's 15.0%; equal at top-3
APE_TEMPERATURE = 0.8
# the options only the torch engine runs, each with the value that leaves `kv` as it is
TORCH_ONLY = {"kv_recompute": 0.0, "kv_recompute_refresh": False, "kv_link_tokens": 0, "kv_temperature": 1.0,
              "kv_scale": 1.0}
_FIELDS = {"kv_recompute": "recompute", "kv_recompute_refresh": "refresh", "kv_link_tokens": "link_tokens",
           "kv_positions": "positions",
           "kv_temperature": "temperature", "kv_scale": "scale"}
