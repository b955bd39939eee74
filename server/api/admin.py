"""Models, health, metrics and the document endpoints."""

from __future__ import annotations

import asyncio
import time
from typing import Optional

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from indexes.ingest import DocumentError, validate_document

from ..errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, StrategyUnavailable
from .auth import Principal, require_admin, require_client
from .deps import get_runtime
from .protocol import (BuildRequest, DetokenizeRequest, DocumentsRequest, RetrieveRequest, TokenizeRequest,
                       check_model, template_messages)

router = APIRouter()


@router.get("/v1/models", dependencies=[Depends(require_client)])
async def models(rt=Depends(get_runtime)):
    return {"object": "list", "data": [{
        "id": rt.settings.served_model_name, "object": "model", "created": int(rt.started_at), "owned_by": "knowmux",
        "root": rt.engine.model_id, "max_model_len": rt.pipeline.max_context, "engine": rt.engine.name,
        "strategies": rt.pipeline.routable_strategies(), **rt.placement()}]}


@router.get("/health")
async def health(rt=Depends(get_runtime)):
    ok, reason = rt.engine.health()
    body = {"status": "ok" if ok else "unhealthy", "engine": rt.engine.name, "reason": reason,
            "strategies": rt.pipeline.routable_strategies(),
            "documents": rt.kb.count() if rt.kb is not None else 0, **rt.placement(), **rt.engine.stats()}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(rt=Depends(get_runtime)):
    if rt.kb is not None:
        rt.metrics.documents.set(rt.kb.count())
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/documents")
async def add_documents(body: DocumentsRequest, rt=Depends(get_runtime), who: Principal = Depends(require_admin)):
    limit = rt.settings.max_documents_per_call
    if len(body.documents) > limit:
        raise PayloadTooLarge(f"{len(body.documents)} documents in one call, over the limit of {limit}",
                              param="documents")
    docs = []
    for i, raw in enumerate(body.documents):
        try:
            docs.append(validate_document(raw.model_dump(), rt.settings.max_document_chars, where=f"documents[{i}]",
                                          added_by=who.name))
        except DocumentError as e:
            cls = PayloadTooLarge if e.too_large else InvalidRequest
            raise cls(str(e), param=f"documents[{i}]") from None
    for kind in body.build:
        rt.builder(kind)  # refuse before writing anything
    t0 = time.perf_counter()
    results = await asyncio.to_thread(rt.kb.upsert, docs)
    out = {"object": "list", "data": [{"id": i, "status": st} for i, st in results],
           "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    jobs = [(await asyncio.to_thread(rt.jobs.submit, kind, [i for i, _ in results], rt.builder(kind))).view()
            for kind in body.build]
    if jobs:
        out["jobs"] = jobs
        out["job"] = jobs[0]
    return out


@router.post("/v1/retrieve", dependencies=[Depends(require_client)])
async def retrieve(body: RetrieveRequest, rt=Depends(get_runtime)):
    """What retrieval returns for a query: the documents a strategy would use."""
    if not 1 <= body.top_k <= rt.settings.max_top_k:
        raise InvalidRequest(f"top_k must be between 1 and {rt.settings.max_top_k}", param="top_k")
    hits = await asyncio.to_thread(rt.kb.search, body.query, body.top_k)
    return {"object": "list", "data": [{"id": h.doc_id, "score": round(h.score, 6)} for h in hits]}


@router.post("/tokenize", dependencies=[Depends(require_client)])
async def tokenize(body: TokenizeRequest, rt=Depends(get_runtime)):
    """Token ids of a prompt, or of chat messages as the model's template renders them, as
    vLLM's /tokenize; ``count`` against ``max_model_len`` is the budget left to generate."""
    check_model(body.model, rt.settings.served_model_name)
    if (body.prompt is None) == (body.messages is None):
        raise InvalidRequest("send either prompt or messages", param="prompt")
    if body.prompt is not None:  # off the event loop: a prompt may be megabytes
        ids = await asyncio.to_thread(rt.engine.tokenizer.encode, body.prompt,
                                      add_special_tokens=body.add_special_tokens)
    else:
        ids = await asyncio.to_thread(rt.prompts.plain, template_messages(body.messages))
    return {"count": len(ids), "max_model_len": rt.pipeline.max_context, "tokens": ids, "token_strs": None}


@router.post("/detokenize", dependencies=[Depends(require_client)])
async def detokenize(body: DetokenizeRequest, rt=Depends(get_runtime)):
    check_model(body.model, rt.settings.served_model_name)
    vocab = len(rt.engine.tokenizer)
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    return {"prompt": rt.engine.tokenizer.decode(body.tokens)}


@router.post("/v1/builds", dependencies=[Depends(require_admin)])
async def start_build(body: BuildRequest, rt=Depends(get_runtime)):
    """Build artefacts (KV caches, adapters) of stored documents in a background job."""
    build = rt.builder(body.kind)
    known = await asyncio.to_thread(rt.kb.get_many, body.doc_ids)
    unknown = [d for d in body.doc_ids if d not in known]
    if unknown:
        raise NotFound(f"no document with id {unknown[0]!r}" + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1
                                                               else ""), param="doc_ids")
    return (await asyncio.to_thread(rt.jobs.submit, body.kind, body.doc_ids, build)).view()


@router.get("/v1/jobs", dependencies=[Depends(require_admin)])
async def list_jobs(limit: int = 20, rt=Depends(get_runtime)):
    """The newest build jobs first (queued, running, finished, failed, cancelled)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100", param="limit")
    jobs = await asyncio.to_thread(rt.jobs.recent, limit)
    return {"object": "list", "data": [j.view() for j in jobs]}


@router.get("/v1/jobs/{job_id}", dependencies=[Depends(require_admin)])
async def get_job(job_id: str, rt=Depends(get_runtime)):
    job = await asyncio.to_thread(rt.jobs.get, job_id)  # a query when the store is shared
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    return job.view()


@router.post("/v1/jobs/{job_id}/cancel", dependencies=[Depends(require_admin)])
async def cancel_job(job_id: str, rt=Depends(get_runtime)):
    """Stop a queued or running build before its next group (what is built stays built;
    the job is not resumed after a restart)."""
    job = await asyncio.to_thread(rt.jobs.cancel, job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    if job.status != "cancelled":
        raise Conflict(f"job {job_id} has already ended ({job.status}); nothing to cancel", param="job_id")
    return job.view()


async def _describe(rt, service, what: str, doc_id: str) -> dict:
    if service is None:
        raise StrategyUnavailable(f"the {rt.engine.name} engine has no {what}")
    doc = await asyncio.to_thread(rt.kb.store.get, doc_id)
    if doc is None:
        raise NotFound(f"no document with id {doc_id!r}", param="doc_id")
    return await asyncio.to_thread(service.describe, doc)


@router.get("/v1/adapters/{doc_id:path}", dependencies=[Depends(require_client)])
async def get_adapter(doc_id: str, rt=Depends(get_runtime)):
    return await _describe(rt, rt.artefacts.prag, "adapter bank", doc_id)


@router.get("/v1/kv/{doc_id:path}", dependencies=[Depends(require_client)])
async def get_kv(doc_id: str, rt=Depends(get_runtime)):
    return await _describe(rt, rt.artefacts.kv, "KV store", doc_id)


@router.get("/v1/documents", dependencies=[Depends(require_client)])
async def list_documents(limit: int = 20, after: Optional[str] = None, rt=Depends(get_runtime)):
    """Stored documents in id order, ``limit`` at a time after the id ``after`` (OpenAI's
    list shape: ``first_id``, ``last_id``, ``has_more``), each with the artefacts stored for
    it, without its text (``GET /v1/documents/{id}`` has it)."""
    if not 1 <= limit <= 100:
        raise InvalidRequest("limit must be between 1 and 100", param="limit")

    def read():
        docs = rt.kb.store.page(after, limit + 1)
        return docs, [rt.artefacts.stored(d) for d in docs[:limit]]

    docs, artefacts = await asyncio.to_thread(read)
    data = [{"id": d.id, "object": "document", "title": d.title, "content_hash": d.content_hash,
             "added_by": d.added_by, "created_at": d.created_at, "updated_at": d.updated_at, "artefacts": a}
            for d, a in zip(docs, artefacts)]
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": len(docs) > limit}


@router.get("/v1/documents/{doc_id:path}", dependencies=[Depends(require_client)])
async def get_document(doc_id: str, rt=Depends(get_runtime)):
    doc = await asyncio.to_thread(rt.kb.store.get, doc_id)
    if doc is None:
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    return {"id": doc.id, "title": doc.title, "text": doc.text, "content_hash": doc.content_hash,
            "added_by": doc.added_by, "created_at": doc.created_at, "updated_at": doc.updated_at}


@router.delete("/v1/documents/{doc_id:path}", dependencies=[Depends(require_admin)])
async def delete_document(doc_id: str, rt=Depends(get_runtime)):
    doc = await asyncio.to_thread(rt.kb.store.get, doc_id)
    if doc is None or not await asyncio.to_thread(rt.kb.delete, doc_id):
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    removed = await asyncio.to_thread(rt.artefacts.forget, doc, rt.kb)
    return {"id": doc_id, "object": "document", "deleted": True, "artefacts_removed": removed}
