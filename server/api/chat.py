"""POST /v1/chat/completions: OpenAI's shapes, streaming as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..engine.types import SamplingParams
from ..errors import EngineError, InvalidRequest, KnowmuxError
from ..pipeline import ChatInput, Prepared
from .auth import require_client
from .deps import get_runtime
from .errors import error_body, status_of
from .protocol import KNOWN_IGNORED, ChatCompletionRequest, check_model, template_messages
from .serving_chat import (knowmux_field, labels_of, logprobs_of, prepare_choices, record, response_headers,
                           start_choices, usage_of, usage_over)

log = logging.getLogger(__name__)
router = APIRouter()


def to_input(body: ChatCompletionRequest, request: Request, served: str) -> ChatInput:
    check_model(body.model, served)
    if body.strategies is not None:
        if body.n != 1:
            raise InvalidRequest("n and strategies cannot be combined: strategies gives one choice each",
                                 param="strategies")
        if body.strategy is not None or request.headers.get("x-strategy"):
            raise InvalidRequest("strategies replaces strategy and X-Strategy; send one of them", param="strategies")
    if body.top_logprobs is not None and not body.logprobs:
        raise InvalidRequest("top_logprobs needs logprobs set to true", param="top_logprobs")
    bias = tuple((int(key), float(value)) for key, value in (body.logit_bias or {}).items())
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
    messages = template_messages(body.messages)
    return ChatInput(
        request_id=f"chatcmpl-{uuid.uuid4().hex}",
        messages=messages,
        strategy=header_strategy or body.strategy,
        strategy_source="header" if header_strategy else "body" if body.strategy else None,
        experiment=request.headers.get("x-experiment"),
        user=body.user or request.headers.get("x-user-id"), latency_budget_ms=budget,
        top_k=body.top_k,
        sampling=SamplingParams(
            max_tokens=body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens,
            temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=stop, ignore_eos=body.ignore_eos,
            logprobs=(body.top_logprobs or 0) if body.logprobs else None, presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty, logit_bias=bias),
        options=body.strategy_options())


@router.post("/v1/chat/completions", dependencies=[Depends(require_client)])
async def chat_completions(body: ChatCompletionRequest, request: Request, rt=Depends(get_runtime)):
    labels = (request.headers.get("x-strategy") or body.strategy or rt.settings.default_strategy,
              request.headers.get("x-experiment") or "", "")
    try:
        inp = to_input(body, request, rt.settings.served_model_name)
        preps = await prepare_choices(rt, inp, body)
        labels = labels_of(preps[0])
        streams = start_choices(rt, preps)
    except KnowmuxError as exc:
        rt.metrics.failed(labels, status_of(exc), exc.code or exc.type)
        raise
    for p in preps:
        rt.metrics.routes.labels(p.strategy, p.route.rule).inc()
    headers = response_headers(preps)
    created = int(time.time())
    model = rt.settings.served_model_name
    one_prompt = not body.strategies  # n choices share one prompt, counted once as OpenAI does
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(rt, preps, streams, created, model, include_usage, one_prompt),
                                 media_type="text/event-stream", headers=headers)
    try:
        results = await asyncio.gather(*(_collect(st) for st in streams))
    finally:
        for st in streams:
            st.cancel()
    for p, (_, _, last, _) in zip(preps, results):
        if last.finish_reason == "error":
            rt.metrics.failed(labels_of(p), 500, "engine_error")
            raise EngineError(last.error or "engine error")
    choices, lasts = [], []
    for i, (p, (parts, lps, last, t_end)) in enumerate(zip(preps, results)):
        total_ms = (t_end - p.t_start) * 1e3
        record(rt, p, last, total_ms)
        choice = {"index": i, "message": {"role": "assistant", "content": "".join(parts)},
                  "logprobs": logprobs_of(rt.engine.tokenizer, lps) if inp.sampling.logprobs is not None else None,
                  "finish_reason": last.finish_reason}
        kx = knowmux_field(p, last.timings, total_ms)
        if len(preps) > 1:
            choice["knowmux"] = {**kx, "usage": usage_of(last)}
        choices.append(choice)
        lasts.append(last)
    out = {"id": inp.request_id, "object": "chat.completion", "created": created, "model": model,
           "choices": choices, "usage": usage_over(lasts, one_prompt)}
    if len(preps) == 1:
        out["knowmux"] = kx
        tm = kx["timings_ms"]
        headers["Server-Timing"] = ", ".join(f"{k};dur={tm.get(k, 0.0):.1f}" for k in ("retrieve", "prefill", "decode"))
    return JSONResponse(out, headers=headers)


async def _collect(events) -> tuple[list[str], list, object, float]:
    """A choice's text pieces, logprobs, last event and the time it finished."""
    parts, lps, last = [], [], None
    async for ev in events:
        parts.append(ev.text)
        lps += ev.logprobs
        last = ev
    return parts, lps, last, time.perf_counter()


async def _sse(rt, preps: list[Prepared], streams: list, created: int, model: str, include_usage: bool,
               one_prompt: bool) -> AsyncIterator[str]:
    rid, multi = preps[0].input.request_id, len(preps) > 1

    def chunk(choices: list, **extra) -> str:
        body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body)}\n\n"

    def choice(i: int, delta: dict, finish=None, logprobs=None, **extra) -> dict:
        return {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish, **extra}

    def content(i: int, ev) -> str:  # a token's logprobs travel with it even while its text is held back
        lps = logprobs_of(rt.engine.tokenizer, ev.logprobs) if ev.logprobs else None
        return chunk([choice(i, {"content": ev.text}, logprobs=lps)])

    merged: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, events) -> None:
        async for ev in events:
            merged.put_nowait((i, ev))

    async def next_event() -> tuple[int, object]:  # one choice: read its stream directly
        return (0, await anext(streams[0])) if not multi else await merged.get()

    pumps = [asyncio.create_task(pump(i, st)) for i, st in enumerate(streams)] if multi else []
    try:
        yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(len(preps))])
        lasts = [None] * len(preps)
        while any(last is None for last in lasts):
            i, ev = await next_event()
            p = preps[i]
            if ev.finish_reason == "error":
                rt.metrics.failed(labels_of(p), 500, "engine_error")
                yield f"data: {json.dumps(error_body(ev.error or 'engine error', 'server_error', None, 'engine_error'))}\n\n"
                break
            if ev.text or ev.logprobs:
                yield content(i, ev)
            if ev.finish_reason is None:
                continue
            lasts[i] = ev
            total_ms = (time.perf_counter() - p.t_start) * 1e3
            record(rt, p, ev, total_ms)
            kx = knowmux_field(p, ev.timings, total_ms)
            if multi:
                yield chunk([choice(i, {}, ev.finish_reason, knowmux={**kx, "usage": usage_of(ev)})])
            elif include_usage:
                yield chunk([choice(i, {}, ev.finish_reason)])
                yield chunk([], usage=usage_of(ev), knowmux=kx)
            else:
                yield chunk([choice(i, {}, ev.finish_reason)], usage=usage_of(ev), knowmux=kx)
        else:
            if multi and include_usage:
                yield chunk([], usage=usage_over(lasts, one_prompt))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        for st in streams:
            st.cancel()  # the client went away or we are done: free the batch slots
