"""Serving a chat request's choices: planning and submitting them together (``n`` choices
on one route, or one per strategy of ``strategies``), and what each answer carries
beyond its text: usage, the ``knowmux`` field, response headers, metrics and OpenAI's
logprobs shape. chat.py speaks HTTP (the route, the body, the event stream) around it."""

from __future__ import annotations

from dataclasses import replace
from urllib.parse import quote

from ..pipeline import ChatInput, Prepared
from .protocol import ChatCompletionRequest


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


def labels_of(p: Prepared) -> tuple[str, str, str]:
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


def logprobs_of(tokenizer, lps) -> dict:
    """TokenLogprobs in OpenAI's chat shape. -inf (a token a logits hook masked) is sent as
    -9999.0, as vLLM does, since JSON has no infinity."""
    def entry(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": max(logprob, -9999.0), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(i, v) for i, v in lp.top]}
                        for lp in lps]}


def usage_of(ev) -> dict:
    return usage_over([ev], True)


def usage_over(lasts: list, one_prompt: bool) -> dict:
    """Usage over choices: completions summed; prompts once when the choices share one."""
    prompts = lasts[:1] if one_prompt else lasts
    prompt, completion = sum(e.prompt_tokens for e in prompts), sum(e.completion_tokens for e in lasts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": sum(e.cached_tokens for e in prompts)}}


def record(rt, p: Prepared, last, total_ms: float) -> None:
    m, labels = rt.metrics, labels_of(p)
    m.requests.labels(*labels, "200").inc()
    m.latency.labels(*labels).observe(total_ms / 1e3)
    if last.timings is not None:
        m.ttft.labels(*labels).observe((last.timings.ttft_ms + p.plan_ms) / 1e3)
        rt.pipeline.observe(p, last.prompt_tokens, last.cached_tokens, last.timings.prefill_ms)
    m.tokens.labels(*labels, "prompt").inc(last.prompt_tokens)
    m.tokens.labels(*labels, "completion").inc(last.completion_tokens)
