"""The request path between HTTP and the engine.

    ChatInput -> route (explicit strategy, experiment arm, or the `auto` router)
    -> strategy.plan (off the event loop) -> limits and context checks -> GenRequest
    -> engine (EventStream) -> TokenEvents

Knows nothing of HTTP: the API layer builds a ChatInput and formats what comes back.
Assembles nothing either: server.runtime builds the services and hands them in.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field, replace
from typing import Optional

from .config import Settings
from .engine.aio import EventStream
from .engine.types import GenRequest, SamplingParams
from .errors import ContextLengthExceeded, InvalidRequest, UnknownExperiment
from .router import Experiments, Router
from .strategies import AUTO, Plan, Query, StrategyContext, get_strategy


@dataclass(frozen=True)
class ChatInput:
    request_id: str
    messages: list[dict]  # [{"role": str, "content": str}]
    strategy: Optional[str] = None  # header value wins over the body's; resolved by the API layer
    strategy_source: Optional[str] = None  # "header" | "body": where an explicit strategy came from
    experiment: Optional[str] = None  # X-Experiment
    user: Optional[str] = None  # OpenAI `user` or X-User-Id: keys the experiment arm
    latency_budget_ms: Optional[float] = None  # X-Latency-Budget-Ms, for the router (time to first token)
    top_k: Optional[int] = None
    sampling: SamplingParams = SamplingParams()  # max_tokens None: as many as fit, up to the default
    options: dict = field(default_factory=dict)  # strategy options as sent (server.options has their ranges)


@dataclass(frozen=True)
class Route:
    strategy: str
    reason: str  # one short phrase: the rule, the classifier's choice, the arm, or "explicit ..."
    rule: str  # the deciding rule's fixed name (router rules, "explicit", "experiment", "server_default")
    experiment: Optional[str] = None
    arm: Optional[str] = None
    top_k: Optional[int] = None  # set by an experiment arm, or by the router when it narrows the passages
    options: dict = field(default_factory=dict)  # set by an experiment arm
    hits: Optional[list] = None  # retrieval already done by the router


@dataclass
class Prepared:
    input: ChatInput
    plan: Plan
    request: GenRequest
    t_start: float
    plan_ms: float = 0.0  # request start -> submitted to the engine (retrieval, KV loading, adapters, ...)
    route: Optional[Route] = None

    @property
    def strategy(self) -> str:
        return self.plan.strategy


class Pipeline:
    """Resolves a request's strategy, plans it and submits it; the services it uses are
    assembled by server.runtime."""

    def __init__(self, engine, ctx: StrategyContext, router: Router, experiments: Experiments,
                 settings: Settings, supported: list[str], sampling_defaults: Optional[dict] = None):
        self.engine, self.ctx, self.router, self.experiments = engine, ctx, router, experiments
        self.settings, self.supported = settings, supported
        # what a request that sets no temperature/top_p gets (server.sampling_defaults)
        self.sampling_defaults = sampling_defaults or {"temperature": 1.0, "top_p": 1.0}
        self.max_context = engine.max_context if settings.max_context is None else \
            min(settings.max_context, engine.max_context)

    def routable_strategies(self) -> list[str]:
        """What a request to this server may name and have run: auto and the supported strategies."""
        return [AUTO, *self.supported]

    def resolve(self, inp: ChatInput, top_k: int, question: str) -> Route:
        """Which strategy answers, and why: an explicit strategy wins over an experiment,
        an experiment arm over the router; `auto` (the default) asks the router."""
        name, reason, rule, exp, arm, arm_top_k, options = inp.strategy, None, None, None, None, None, {}
        if inp.experiment is not None:
            try:
                experiment = self.experiments.get(inp.experiment)
            except KeyError as e:
                raise UnknownExperiment(str(e.args[0]), param="X-Experiment") from None
            exp = experiment.name
            if name:
                reason, rule = f"explicit strategy ({inp.strategy_source}) overrides experiment {exp}", "explicit"
            else:
                a = self.experiments.assign(exp, inp.user)
                arm, name = a.name, a.strategy
                arm_top_k = a.params.get("top_k")
                options = {k: v for k, v in a.params.items() if k != "top_k"}
                reason, rule = f"experiment {exp} arm {arm}", "experiment"
        elif name and name != AUTO:
            reason, rule = f"explicit strategy ({inp.strategy_source})", "explicit"
        name = self.settings.default_strategy if name is None else name
        if name != AUTO:
            return Route(name, reason or "server default", rule or "server_default", exp, arm, arm_top_k, options)
        d = self.router.route(inp.messages, question, top_k if arm_top_k is None else arm_top_k,
                              inp.latency_budget_ms)
        return Route(d.strategy, f"{reason}: {d.reason}" if reason else d.reason, d.rule, exp, arm,
                     arm_top_k if d.top_k is None else d.top_k, options, d.hits)

    def observe(self, prepared: Prepared, prompt_tokens: int, cached_tokens: int, prefill_ms: float) -> None:
        """A request finished: feed its prefill rate to the router's latency estimates."""
        if len(prepared.request.rows) == 1 and prepared.request.rows[0].prefix is None:
            self.router.observe_prefill(prompt_tokens - cached_tokens, prefill_ms)

    def _check_top_k(self, top_k: int) -> None:
        """top_k within this server's max_top_k (the wire checks only that it is >= 1)."""
        if not 1 <= top_k <= self.settings.max_top_k:
            raise InvalidRequest(f"top_k must be between 1 and {self.settings.max_top_k}", param="top_k")

    def _top_k(self, inp: ChatInput) -> int:
        return self.settings.default_top_k if inp.top_k is None else inp.top_k

    @staticmethod
    def _question(inp: ChatInput) -> Optional[str]:
        """The last user message: what retrieval searches for."""
        return next((m["content"] for m in reversed(inp.messages) if m["role"] == "user"), None)

    async def prepare(self, inp: ChatInput, t_start: Optional[float] = None) -> Prepared:
        """Route and plan ``inp``. ``t_start``: when the client's request began, if before
        now (a later choice of a several-choice request counts from the request's start)."""
        t0 = time.perf_counter() if t_start is None else t_start
        s = self.settings
        top_k = self._top_k(inp)
        self._check_top_k(top_k)
        if inp.sampling.max_tokens is not None and not 1 <= inp.sampling.max_tokens <= s.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {s.max_tokens_limit}", param="max_tokens")
        question = self._question(inp)
        if not question or not question.strip():
            raise InvalidRequest("messages need at least one non-empty user message", param="messages")
        if inp.latency_budget_ms is not None and not 0 < inp.latency_budget_ms < float("inf"):
            raise InvalidRequest("X-Latency-Budget-Ms must be a positive number of milliseconds",
                                 param="X-Latency-Budget-Ms", code="invalid_value")
        if inp.strategy is not None and inp.strategy != AUTO:
            get_strategy(inp.strategy)  # an unknown name is refused before any retrieval
        route = await asyncio.to_thread(self.resolve, inp, top_k, question)
        if route.strategy not in self.supported:
            raise InvalidRequest(f"strategy {route.strategy!r} cannot run on the {self.engine.name} engine "
                                 f"(it runs: {', '.join(self.supported)}); serve with --engine torch for it",
                                 param="strategy", code="strategy_not_supported")
        return await self._plan(inp, route, question, top_k, t0)

    async def again(self, first: Prepared, index: int) -> Prepared:
        """Choice ``index`` (n > 1) of the request ``first`` was prepared for: the same route
        (strategy, experiment arm, retrieval), planned afresh so that per-request state such
        as CK-PLUG's trace is its own; seeded ``seed + index`` when a seed was given."""
        inp = first.input
        seed = inp.sampling.seed
        inp = replace(inp, request_id=f"{inp.request_id}-{index}",
                      sampling=replace(inp.sampling, seed=seed + index if seed is not None else None))
        return await self._plan(inp, first.route, self._question(inp), self._top_k(inp), first.t_start)

    async def _plan(self, inp: ChatInput, route: Route, question: str, top_k: int, t0: float) -> Prepared:
        s = self.settings
        strategy = get_strategy(route.strategy)
        if route.top_k is not None:
            top_k = route.top_k
            self._check_top_k(top_k)  # an experiment arm's, which the experiments file bounds at 100
        # what the request left unset (max_tokens until the prompt's length is known, below)
        defaults = {"max_tokens": s.default_max_tokens, **self.sampling_defaults}
        sampling = replace(inp.sampling, **{k: v for k, v in defaults.items() if getattr(inp.sampling, k) is None})
        query = Query(inp.request_id, inp.messages, question, top_k, sampling, {**inp.options, **route.options},
                      hits=route.hits)
        plan = await asyncio.to_thread(strategy.plan, query, self.ctx)
        prompt_len = max(len(r.prompt_ids) + (r.prefix.length if r.prefix is not None else 0) for r in plan.rows)
        if inp.sampling.max_tokens is None:  # as much as fits, up to the default
            sampling = replace(sampling, max_tokens=max(1, min(s.default_max_tokens, self.max_context - prompt_len)))
        if prompt_len + sampling.max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{prompt_len + sampling.max_tokens} tokens ({prompt_len} in the messages and retrieved documents, "
                f"{sampling.max_tokens} in the completion). Please reduce the length of the messages, top_k or max_tokens.",
                param="messages")
        req = GenRequest(inp.request_id, plan.rows, sampling, plan.logits_hook)
        return Prepared(inp, plan, req, t0, (time.perf_counter() - t0) * 1e3, route)

    def start(self, prepared: Prepared) -> EventStream:
        """Submit to the engine; raises QueueFull / EngineUnavailable at once, not mid-stream."""
        return EventStream(self.engine, prepared.request)
