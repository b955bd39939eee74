"""`prag` and `prag+rag`: Parametric RAG (Su et al., 2025).

Each document has a LoRA adapter trained offline (adapters/). At query time the top-k
retrieved documents' adapters are combined as the exact sum of their deltas,
    delta W = sum_i s_i (alpha / r) B_i A_i
(concatenating the A's and the scaled B's: peft's ``cat`` combination), and applied to
this request's row only. `prag` answers with the question alone (the same prompt as
`direct`); `prag+rag` also puts the passages in the prompt (the paper's "combine"
mode). A request may name adapters itself: ``"adapters": [{"doc_id", "scale"}]``.
Documents without an adapter are listed in ``knowmux.missing_adapters`` and skipped,
or refused with ``"on_missing": "error"``.
"""

from __future__ import annotations

import time

from adapters.bank import AdapterError
from indexes.store import Document, content_hash

from ..engine.types import RowSpec
from ..errors import InvalidRequest, NotFound, StrategyUnavailable
from ..prompt import Passage
from .base import Plan, Query, Retrieved, Strategy, StrategyContext
from .rag import retrieve


def _named(query: Query, ctx: StrategyContext) -> list[tuple[str, float]]:
    spec = query.options.get("adapters")
    if not spec:
        return []
    out = []
    for i, item in enumerate(spec):
        if not isinstance(item, dict) or not isinstance(item.get("doc_id"), str):
            raise InvalidRequest("adapters must be a list of {\"doc_id\": str, \"scale\": number}",
                                 param=f"adapters[{i}]")
        scale = item.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not -10 <= scale <= 10:
            raise InvalidRequest("scale must be a number between -10 and 10", param=f"adapters[{i}].scale")
        out.append((item["doc_id"], float(scale)))
    return out


class Prag(Strategy):
    name = "prag"
    needs_documents = True
    requires = frozenset({"adapters"})
    passages_in_prompt = False

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        if ctx.prag is None:
            raise StrategyUnavailable("this server has no adapter bank")
        on_missing = query.options.get("on_missing", "skip")
        if on_missing not in ("skip", "error"):
            raise InvalidRequest("on_missing must be skip or error for prag", param="on_missing")
        named = _named(query, ctx)
        timings = {}
        if named:
            docs = ctx.kb.get_many([d for d, _ in named])
            unknown = [d for d, _ in named if d not in docs]
            if unknown:
                raise NotFound(f"no document with id {unknown[0]!r}", param="adapters")
            retrieved = [Retrieved(d, 1.0, docs[d].title) for d, _ in named]
            scales = [s for _, s in named]
            passages = [Passage(d, docs[d].title, docs[d].text) for d, _ in named]
        else:
            retrieved, passages, timings["retrieve"] = retrieve(query, ctx)
            scales = [1.0] * len(retrieved)
        t0 = time.perf_counter()
        # the adapter key needs only the content hash, derived from the passages already in hand
        docs = [Document(p.doc_id, p.text, p.title, content_hash(p.title, p.text)) for p in passages]
        try:
            combined, applied, missing, corrupt = ctx.prag.row_adapters(docs, scales)
        except AdapterError as e:  # e.g. more adapters than the vllm engine's max LoRA rank holds
            raise InvalidRequest(str(e), param="top_k") from None
        if missing and on_missing == "error":
            damaged = f" ({', '.join(corrupt)} failed its checks and was removed)" if corrupt else ""
            raise StrategyUnavailable(f"no adapter for {', '.join(missing)}{damaged} (on_missing: error); build them "
                                      f"with knowmux ingest --build adapters", param="on_missing")
        timings["combine"] = (time.perf_counter() - t0) * 1e3
        if self.passages_in_prompt:
            ids = ctx.prompts.with_passages(query.messages, passages).ids
        else:
            ids = ctx.prompts.plain(query.messages)
        return Plan(self.name, [RowSpec(ids, adapters=combined)], retrieved, timings_ms=timings,
                    info={"missing_adapters": missing, "corrupt_adapters": corrupt, "adapters_applied": applied})


class PragRag(Prag):
    name = "prag+rag"
    passages_in_prompt = True
