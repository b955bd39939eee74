"""`rag`: in-context retrieval-augmented generation (Lewis et al. 2020, standard RAG).

Embed the question, take the top-k passages by cosine similarity (FAISS inner
product over normalised all-MiniLM-L6-v2 vectors), place them in the shared prompt
layout (server.prompt) and prefill everything.
"""

from __future__ import annotations

import time

from ..engine.types import RowSpec
from ..errors import StrategyUnavailable
from ..prompt import Passage
from .base import Plan, Query, Retrieved, Strategy, StrategyContext


def retrieve(query: Query, ctx: StrategyContext) -> tuple[list[Retrieved], list[Passage], float]:
    """Top-k hits with their documents; also the retrieval time in ms."""
    if ctx.kb is None or ctx.kb.count() == 0:
        raise StrategyUnavailable("no documents are ingested: add some with POST /v1/documents or knowmux ingest")
    t0 = time.perf_counter()
    if query.hits is not None and len(query.hits) >= query.top_k:
        hits = query.hits[:query.top_k]
    else:
        hits = ctx.kb.search(query.question, query.top_k)
    docs = ctx.kb.get_many([h.doc_id for h in hits])
    hits = [h for h in hits if h.doc_id in docs]  # a document deleted since the search is dropped
    retrieved = [Retrieved(h.doc_id, h.score, docs[h.doc_id].title) for h in hits]
    passages = [Passage(h.doc_id, docs[h.doc_id].title, docs[h.doc_id].text) for h in hits]
    return retrieved, passages, (time.perf_counter() - t0) * 1e3


class Rag(Strategy):
    name = "rag"
    needs_documents = True

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:
        retrieved, passages, ms = retrieve(query, ctx)
        layout = ctx.prompts.with_passages(query.messages, passages)
        return Plan(self.name, [RowSpec(layout.ids)], retrieved, timings_ms={"retrieve": ms})
