"""POST /v1/chat/completions: OpenAI's shapes, streaming as server-sent events."""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import EngineError, InvalidRequest, KnowmuxError, ModelNotFound
from ..pipeline import ChatInput, Prepared
from .auth import require_client
from .deps import get_runtime
from .errors import error_body, status_of
from .protocol import KNOWN_IGNORED, ChatCompletionRequest

log = logging.getLogger(__name__)
router = APIRouter()
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs


def to_input(body: ChatCompletionRequest, request: Request, served: str) -> ChatInput:
    if body.model != served:
        raise ModelNotFound(f"The model {body.model!r} does not exist; this server serves {served!r}", param="model")
    if body.n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    if body.top_logprobs is not None:
        if not body.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}", param="top_logprobs")
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not (key.isascii() and key.isdigit()) or not -100.0 <= value <= 100.0:
            raise InvalidRequest(f"logit_bias maps token ids (as strings) to numbers in -100..100; got {key!r}: "
                                 f"{value!r}", param="logit_bias")
        bias.append((int(key), float(value)))
    extras = set(body.model_extra or {}) - KNOWN_IGNORED
    if extras:
        log.info("ignoring unknown request fields: %s", ", ".join(sorted(extras)))
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    header_strategy = request.headers.get("x-strategy")
    budget = request.headers.get("x-latency-budget-ms")
    if budget is not None:
        try:
            budget = float(budget)
        except ValueError:
            raise InvalidRequest("X-Latency-Budget-Ms must be a positive number of milliseconds",
                                 param="X-Latency-Budget-Ms", code="invalid_value") from None
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    return ChatInput(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=messages,
        strategy=header_strategy or body.strategy,
        strategy_source="header" if header_strategy else "body" if body.strategy else None,
        experiment=request.headers.get("x-experiment"),
        user=body.user or request.headers.get("x-user-id"), latency_budget_ms=budget,
        top_k=body.top_k,
        max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
        temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop,
        ignore_eos=body.ignore_eos, logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, logit_bias=tuple(bias),
        options=body.strategy_options())


def knowmux_field(p: Prepared, timings, total_ms: float) -> dict:
    t = dict(p.plan.timings_ms, plan=p.plan_ms)
    if timings is not None:
        t.update(queue=timings.queued_ms, prefill=timings.prefill_ms, decode=timings.decode_ms,
                 ttft=p.plan_ms + timings.ttft_ms)
    t["total"] = total_ms
    return {"strategy": p.strategy, "route_reason": p.route.reason,
            "retrieved": [{"id": r.doc_id, "score": round(r.score, 6), "title": r.title} for r in p.plan.retrieved],
            "timings_ms": {k: round(v, 2) for k, v in t.items()}, **p.plan.info,
            **(p.plan.report() if p.plan.report is not None else {})}


def response_headers(p: Prepared) -> dict:
    # Header values must be latin-1 and the list is comma-separated: percent-escape
    # each id (RFC 3986 unreserved characters pass as they are). Route reasons and
    # experiment/arm names are built from validated names and numbers only.
    ids = ",".join(quote(r.doc_id, safe="") for r in p.plan.retrieved)
    h = {"X-Strategy": p.strategy, "X-Route-Reason": p.route.reason, "X-Retrieved-Docs": ids}
    if p.route.experiment is not None:
        h["X-Experiment"] = p.route.experiment
        if p.route.arm is not None:
            h["X-Experiment-Arm"] = p.route.arm
    return h


def _labels(p: Prepared) -> tuple[str, str, str]:
    return p.strategy, p.route.experiment or "", p.route.arm or ""


@router.post("/v1/chat/completions", dependencies=[Depends(require_client)])
async def chat_completions(body: ChatCompletionRequest, request: Request, rt=Depends(get_runtime)):
    labels = (request.headers.get("x-strategy") or body.strategy or rt.settings.default_strategy,
              request.headers.get("x-experiment") or "", "")
    try:
        inp = to_input(body, request, rt.settings.served_model_name)
        prepared = await rt.pipeline.prepare(inp)
        labels = _labels(prepared)
        events = rt.pipeline.start(prepared)
    except KnowmuxError as exc:
        rt.metrics.failed(labels, status_of(exc), exc.code or exc.type)
        raise
    rt.metrics.routes.labels(prepared.strategy, prepared.route.rule).inc()
    headers = response_headers(prepared)
    created = int(time.time())
    model = rt.settings.served_model_name
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(rt, prepared, events, created, model, include_usage),
                                 media_type="text/event-stream", headers=headers)
    parts, lps, last = [], [], None
    try:
        async for ev in events:
            parts.append(ev.text)
            lps += ev.logprobs
            last = ev
    finally:
        events.cancel()
    if last.finish_reason == "error":
        rt.metrics.failed(labels, 500, "engine_error")
        raise EngineError(last.error or "engine error")
    total_ms = (time.perf_counter() - prepared.t_start) * 1e3
    _record(rt, prepared, last, total_ms)
    kx = knowmux_field(prepared, last.timings, total_ms)
    tm = kx["timings_ms"]
    headers["Server-Timing"] = ", ".join(f"{k};dur={tm.get(k, 0.0):.1f}" for k in ("retrieve", "prefill", "decode"))
    return JSONResponse({
        "id": inp.request_id, "object": "chat.completion", "created": created, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(parts)},
                     "logprobs": _logprobs(rt.engine.tokenizer, lps) if inp.logprobs is not None else None,
                     "finish_reason": last.finish_reason}],
        "usage": _usage(last), "knowmux": kx}, headers=headers)


def _logprobs(tokenizer, lps) -> dict:
    """TokenLogprobs in OpenAI's chat shape. -inf (a token a logits hook masked) is sent as
    -9999.0, as vLLM does, since JSON has no infinity."""
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def _usage(ev) -> dict:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": ev.cached_tokens}}


def _record(rt, p: Prepared, last, total_ms: float) -> None:
    m, labels = rt.metrics, _labels(p)
    m.requests.labels(*labels, "200").inc()
    m.latency.labels(*labels).observe(total_ms / 1e3)
    if last.timings is not None:
        m.ttft.labels(*labels).observe((last.timings.ttft_ms + p.plan_ms) / 1e3)
        rt.pipeline.observe(p, last.prompt_tokens, last.cached_tokens, last.timings.prefill_ms)
    m.tokens.labels(*labels, "prompt").inc(last.prompt_tokens)
    m.tokens.labels(*labels, "completion").inc(last.completion_tokens)


async def _sse(rt, p: Prepared, events, created: int, model: str, include_usage: bool) -> AsyncIterator[str]:
    def chunk(delta: dict, finish=None, logprobs=None, **extra) -> str:
        body = {"id": p.input.request_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}], **extra}
        return f"data: {json.dumps(body)}\n\n"

    def content(ev) -> str:  # a token's logprobs travel with it even while its text is held back
        return chunk({"content": ev.text}, logprobs=_logprobs(rt.engine.tokenizer, ev.logprobs) if ev.logprobs else None)

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for ev in events:
            if ev.finish_reason == "error":
                rt.metrics.failed(_labels(p), 500, "engine_error")
                yield f"data: {json.dumps(error_body(ev.error or 'engine error', 'server_error', None, 'engine_error'))}\n\n"
                break
            if ev.finish_reason is None:
                if ev.text or ev.logprobs:
                    yield content(ev)
                continue
            total_ms = (time.perf_counter() - p.t_start) * 1e3
            _record(rt, p, ev, total_ms)
            kx = knowmux_field(p, ev.timings, total_ms)
            if ev.text or ev.logprobs:
                yield content(ev)
            if include_usage:
                yield chunk({}, ev.finish_reason)
                yield (f"data: {json.dumps({'id': p.input.request_id, 'object': 'chat.completion.chunk', 'created': created, 'model': model, 'choices': [], 'usage': _usage(ev), 'knowmux': kx})}\n\n")
            else:
                yield chunk({}, ev.finish_reason, usage=_usage(ev), knowmux=kx)
        yield "data: [DONE]\n\n"
    finally:
        events.cancel()  # the client went away or we are done: free the batch slot
