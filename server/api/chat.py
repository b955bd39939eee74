"""POST /v1/chat/completions: OpenAI's shapes, streaming as server-sent events."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import replace
from typing import AsyncIterator
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse

from ..errors import EngineError, InvalidRequest, KnowmuxError
from ..pipeline import ChatInput, Prepared
from .auth import require_client
from .deps import get_runtime
from .errors import error_body, status_of
from .protocol import KNOWN_IGNORED, ChatCompletionRequest, check_model, template_messages

log = logging.getLogger(__name__)
router = APIRouter()
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs
MAX_CHOICES = 8  # n, or the strategies compared in one request


def to_input(body: ChatCompletionRequest, request: Request, served: str) -> ChatInput:
    check_model(body.model, served)
    if not 1 <= body.n <= MAX_CHOICES:
        raise InvalidRequest(f"n must be between 1 and {MAX_CHOICES}", param="n")
    if body.strategies is not None:
        if not 1 <= len(body.strategies) <= MAX_CHOICES:
            raise InvalidRequest(f"strategies must name 1 to {MAX_CHOICES} strategies", param="strategies")
        if body.n != 1:
            raise InvalidRequest("n and strategies cannot be combined: strategies gives one choice each",
                                 param="strategies")
        if body.strategy is not None or request.headers.get("x-strategy"):
            raise InvalidRequest("strategies replaces strategy and X-Strategy; send one of them", param="strategies")
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
    messages = template_messages(body.messages)
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


def response_headers(preps: list[Prepared]) -> dict:
    # Header values must be latin-1 and the list is comma-separated: percent-escape
    # each id (RFC 3986 unreserved characters pass as they are). Route reasons and
    # experiment/arm names are built from validated names and numbers only. With several
    # choices: each strategy and reason once, in choice order, and every retrieved id.
    ids = ",".join(dict.fromkeys(quote(r.doc_id, safe="") for p in preps for r in p.plan.retrieved))
    h = {"X-Strategy": ",".join(dict.fromkeys(p.strategy for p in preps)),
         "X-Route-Reason": "; ".join(dict.fromkeys(p.route.reason for p in preps)), "X-Retrieved-Docs": ids}
    first = preps[0]
    if first.route.experiment is not None:
        h["X-Experiment"] = first.route.experiment
        if first.route.arm is not None:
            h["X-Experiment-Arm"] = first.route.arm
    return h


def _labels(p: Prepared) -> tuple[str, str, str]:
    return p.strategy, p.route.experiment or "", p.route.arm or ""


async def prepare_choices(rt, inp: ChatInput, body: ChatCompletionRequest) -> list[Prepared]:
    """One Prepared per choice: ``n`` choices on one route, or one per named strategy.
    Every choice's latency counts from the request's start."""
    if not body.strategies:
        first = await rt.pipeline.prepare(inp)
        return [first] + [await rt.pipeline.again(first, i) for i in range(1, body.n)]
    preps = []
    for i, name in enumerate(body.strategies):
        preps.append(await rt.pipeline.prepare(
            replace(inp, request_id=f"{inp.request_id}-{i}" if i else inp.request_id, strategy=name,
                    strategy_source="body"), t_start=preps[0].t_start if preps else None))
    return preps


def start_choices(rt, preps: list[Prepared]) -> list:
    """Submit every choice, or none: a refusal (queue full) cancels those already queued."""
    streams = []
    try:
        for p in preps:
            streams.append(rt.pipeline.start(p))
    except BaseException:
        for st in streams:
            st.cancel()
        raise
    return streams


@router.post("/v1/chat/completions", dependencies=[Depends(require_client)])
async def chat_completions(body: ChatCompletionRequest, request: Request, rt=Depends(get_runtime)):
    labels = (request.headers.get("x-strategy") or body.strategy or rt.settings.default_strategy,
              request.headers.get("x-experiment") or "", "")
    try:
        inp = to_input(body, request, rt.settings.served_model_name)
        preps = await prepare_choices(rt, inp, body)
        labels = _labels(preps[0])
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
            rt.metrics.failed(_labels(p), 500, "engine_error")
            raise EngineError(last.error or "engine error")
    choices, lasts = [], []
    for i, (p, (parts, lps, last, t_end)) in enumerate(zip(preps, results)):
        total_ms = (t_end - p.t_start) * 1e3
        _record(rt, p, last, total_ms)
        choice = {"index": i, "message": {"role": "assistant", "content": "".join(parts)},
                  "logprobs": _logprobs(rt.engine.tokenizer, lps) if inp.logprobs is not None else None,
                  "finish_reason": last.finish_reason}
        kx = knowmux_field(p, last.timings, total_ms)
        if len(preps) > 1:
            choice["knowmux"] = {**kx, "usage": _usage(last)}
        choices.append(choice)
        lasts.append(last)
    out = {"id": inp.request_id, "object": "chat.completion", "created": created, "model": model,
           "choices": choices, "usage": _usage_of(lasts, one_prompt)}
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


def _logprobs(tokenizer, lps) -> dict:
    """TokenLogprobs in OpenAI's chat shape. -inf (a token a logits hook masked) is sent as
    -9999.0, as vLLM does, since JSON has no infinity."""
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def _usage(ev) -> dict:
    return _usage_of([ev], True)


def _usage_of(lasts: list, one_prompt: bool) -> dict:
    """Usage over choices: completions summed; prompts once when the choices share one."""
    prompts = lasts[:1] if one_prompt else lasts
    prompt, completion = sum(e.prompt_tokens for e in prompts), sum(e.completion_tokens for e in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(e.cached_tokens for e in prompts)}}


def _record(rt, p: Prepared, last, total_ms: float) -> None:
    m, labels = rt.metrics, _labels(p)
    m.requests.labels(*labels, "200").inc()
    m.latency.labels(*labels).observe(total_ms / 1e3)
    if last.timings is not None:
        m.ttft.labels(*labels).observe((last.timings.ttft_ms + p.plan_ms) / 1e3)
        rt.pipeline.observe(p, last.prompt_tokens, last.cached_tokens, last.timings.prefill_ms)
    m.tokens.labels(*labels, "prompt").inc(last.prompt_tokens)
    m.tokens.labels(*labels, "completion").inc(last.completion_tokens)


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
        lps = _logprobs(rt.engine.tokenizer, ev.logprobs) if ev.logprobs else None
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
                rt.metrics.failed(_labels(p), 500, "engine_error")
                yield f"data: {json.dumps(error_body(ev.error or 'engine error', 'server_error', None, 'engine_error'))}\n\n"
                break
            if ev.text or ev.logprobs:
                yield content(i, ev)
            if ev.finish_reason is None:
                continue
            lasts[i] = ev
            total_ms = (time.perf_counter() - p.t_start) * 1e3
            _record(rt, p, ev, total_ms)
            kx = knowmux_field(p, ev.timings, total_ms)
            if multi:
                yield chunk([choice(i, {}, ev.finish_reason, knowmux={**kx, "usage": _usage(ev)})])
            elif include_usage:
                yield chunk([choice(i, {}, ev.finish_reason)])
                yield chunk([], usage=_usage(ev), knowmux=kx)
            else:
                yield chunk([choice(i, {}, ev.finish_reason)], usage=_usage(ev), knowmux=kx)
        else:
            if multi and include_usage:
                yield chunk([], usage=_usage_of(lasts, one_prompt))
        yield "data: [DONE]\n\n"
    finally:
        for task in pumps:
            task.cancel()
        for st in streams:
            st.cancel()  # the client went away or we are done: free the batch slots
