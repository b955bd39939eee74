"""Models, health, metrics and the document endpoints."""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from indexes.ingest import DocumentError, validate_document

from ..errors import InvalidRequest, NotFound, PayloadTooLarge, StrategyUnavailable
from .deps import get_runtime
from .protocol import DocumentsRequest

router = APIRouter()


@router.get("/v1/models")
async def models(rt=Depends(get_runtime)):
    return {"object": "list", "data": [{
        "id": rt.settings.served_model_name, "object": "model", "created": int(rt.started_at), "owned_by": "knowmux",
        "root": rt.engine.model_id, "max_model_len": rt.pipeline.max_context, "engine": rt.engine.name,
        "strategies": rt.pipeline.known_strategies()}]}


@router.get("/health")
async def health(rt=Depends(get_runtime)):
    ok, reason = rt.engine.health()
    body = {"status": "ok" if ok else "unhealthy", "engine": rt.engine.name, "reason": reason,
            "documents": rt.kb.count() if rt.kb is not None else 0, **rt.engine.stats()}
    return JSONResponse(body, status_code=200 if ok else 503)


@router.get("/metrics")
async def metrics(rt=Depends(get_runtime)):
    if rt.kb is not None:
        rt.metrics.documents.set(rt.kb.count())
    return Response(generate_latest(rt.metrics.registry), media_type=CONTENT_TYPE_LATEST)


@router.post("/v1/documents")
async def add_documents(body: DocumentsRequest, rt=Depends(get_runtime)):
    limit = rt.settings.max_documents_per_call
    if len(body.documents) > limit:
        raise PayloadTooLarge(f"{len(body.documents)} documents in one call, over the limit of {limit}",
                              param="documents")
    docs = []
    for i, raw in enumerate(body.documents):
        try:
            docs.append(validate_document(raw.model_dump(), rt.settings.max_document_chars, where=f"documents[{i}]"))
        except DocumentError as e:
            cls = PayloadTooLarge if e.too_large else InvalidRequest
            raise cls(str(e), param=f"documents[{i}]") from None
    if "kv" in body.build and rt.pipeline.kv is None:
        raise StrategyUnavailable(f"the {rt.engine.name} engine cannot build KV caches", param="build")
    t0 = time.perf_counter()
    results = await asyncio.to_thread(rt.kb.upsert, docs)
    out = {"object": "list", "data": [{"id": i, "status": st} for i, st in results],
           "elapsed_ms": round((time.perf_counter() - t0) * 1e3, 1)}
    if "kv" in body.build:
        job = rt.jobs.submit("kv", [i for i, _ in results], lambda doc_id: _build_kv(rt, doc_id))
        out["job"] = job.view()
    return out


def _build_kv(rt, doc_id: str) -> bool:
    doc = rt.kb.store.get(doc_id)
    if doc is None:
        raise LookupError("the document was deleted before its build")
    return rt.pipeline.kv.build_document(doc)


@router.get("/v1/jobs/{job_id}")
async def get_job(job_id: str, rt=Depends(get_runtime)):
    job = rt.jobs.get(job_id)
    if job is None:
        raise NotFound(f"no job with id {job_id!r}", param="job_id")
    return job.view()


@router.get("/v1/kv/{doc_id:path}")
async def get_kv(doc_id: str, rt=Depends(get_runtime)):
    if rt.pipeline.kv is None:
        raise StrategyUnavailable(f"the {rt.engine.name} engine has no KV store")
    doc = await asyncio.to_thread(rt.kb.store.get, doc_id)
    if doc is None:
        raise NotFound(f"no document with id {doc_id!r}", param="doc_id")
    from ..prompt import Passage

    ids = rt.pipeline.prompts.passage_ids(Passage(doc.id, doc.title, doc.text))
    return await asyncio.to_thread(rt.pipeline.kv.describe, doc_id, ids)


@router.get("/v1/documents/{doc_id:path}")
async def get_document(doc_id: str, rt=Depends(get_runtime)):
    doc = await asyncio.to_thread(rt.kb.store.get, doc_id)
    if doc is None:
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    return {"id": doc.id, "title": doc.title, "text": doc.text, "content_hash": doc.content_hash,
            "created_at": doc.created_at, "updated_at": doc.updated_at}


@router.delete("/v1/documents/{doc_id:path}")
async def delete_document(doc_id: str, rt=Depends(get_runtime)):
    if not await asyncio.to_thread(rt.kb.delete, doc_id):
        raise NotFound(f"no document with id {doc_id!r}", param="id")
    return {"id": doc_id, "object": "document", "deleted": True}
