"""The request path between HTTP and the engine.

    ChatInput -> choose strategy -> strategy.plan (off the event loop) -> limits and
    context checks -> GenRequest -> engine (EventStream) -> TokenEvents

Knows nothing of HTTP: the API layer builds a ChatInput and formats what comes back.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Optional

from .config import Settings
from .engine.aio import EventStream
from .engine.types import GenRequest, SamplingParams
from .errors import ContextLengthExceeded, InvalidRequest
from .prompt import PromptBuilder
from .strategies import STRATEGIES, Plan, Query, StrategyContext, get_strategy


@dataclass(frozen=True)
class ChatInput:
    request_id: str
    messages: list[dict]  # [{"role": str, "content": str}]
    strategy: Optional[str] = None  # header value wins over the body's; resolved by the API layer
    top_k: Optional[int] = None
    max_tokens: Optional[int] = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    options: dict = field(default_factory=dict)  # strategy-specific fields, validated by the strategy


@dataclass
class Prepared:
    input: ChatInput
    plan: Plan
    request: GenRequest
    t_start: float
    plan_ms: float = 0.0  # request start -> submitted to the engine (retrieval, KV loading, adapters, ...)

    @property
    def strategy(self) -> str:
        return self.plan.strategy


class Pipeline:
    def __init__(self, engine, kb, settings: Settings, data_dir=None):
        self.engine, self.kb, self.settings = engine, kb, settings
        self.prompts = PromptBuilder(engine.tokenizer)
        kv = prag = None
        if data_dir is not None and hasattr(engine, "runner"):  # KV injection and row deltas need our forward
            from adapters.bank import AdapterBank
            from adapters.recipe import get_recipe

            from .kv.service import KVService
            from .kv.store import KVStore
            from .prag import PragService

            kv = KVService(engine, self.prompts, KVStore(data_dir / "kv", settings.kv_memory_bytes))
            prag = PragService(engine, self.prompts, AdapterBank(data_dir / "adapters"),
                               get_recipe(settings.adapter_recipe))
        self.kv, self.prag = kv, prag
        self.ctx = StrategyContext(kb=kb, prompts=self.prompts, kv=kv, kv_recompute=settings.kv_recompute,
                                   prag=prag)
        self.max_context = min(settings.max_context or engine.max_context, engine.max_context)

    def builder(self, kind: str):
        """The service that builds artefacts of this kind ("kv" or "adapters"), or None if the
        engine cannot; each has ``build_document(doc) -> bool``."""
        return {"kv": self.kv, "adapters": self.prag}[kind]

    def default_strategy(self) -> str:
        return "rag" if self.kb is not None and self.kb.count() > 0 else "direct"

    def known_strategies(self) -> list[str]:
        return list(STRATEGIES)

    async def prepare(self, inp: ChatInput) -> Prepared:
        t0 = time.perf_counter()
        s = self.settings
        name = inp.strategy or self.default_strategy()
        strategy = get_strategy(name)
        top_k = s.default_top_k if inp.top_k is None else inp.top_k
        if not 1 <= top_k <= s.max_top_k:
            raise InvalidRequest(f"top_k must be between 1 and {s.max_top_k}", param="top_k")
        if inp.max_tokens is not None and not 1 <= inp.max_tokens <= s.max_tokens_limit:
            raise InvalidRequest(f"max_tokens must be between 1 and {s.max_tokens_limit}", param="max_tokens")
        question = next((m["content"] for m in reversed(inp.messages) if m["role"] == "user"), None)
        if not question or not question.strip():
            raise InvalidRequest("messages need at least one non-empty user message", param="messages")
        sampling = SamplingParams(max_tokens=inp.max_tokens or s.default_max_tokens, temperature=inp.temperature,
                                  top_p=inp.top_p, seed=inp.seed, stop=inp.stop,
                                  ignore_eos=inp.ignore_eos)
        query = Query(inp.request_id, inp.messages, question, top_k, sampling, inp.options)
        plan = await asyncio.to_thread(strategy.plan, query, self.ctx)
        prompt_len = max(len(r.prompt_ids) + (r.prefix.length if r.prefix is not None else 0) for r in plan.rows)
        if inp.max_tokens is None:  # as much as fits, up to the default
            sampling = SamplingParams(**{**sampling.__dict__,
                                         "max_tokens": max(1, min(s.default_max_tokens, self.max_context - prompt_len))})
        if prompt_len + sampling.max_tokens > self.max_context:
            raise ContextLengthExceeded(
                f"This model's maximum context length is {self.max_context} tokens. However, you requested "
                f"{prompt_len + sampling.max_tokens} tokens ({prompt_len} in the messages and retrieved documents, "
                f"{sampling.max_tokens} in the completion). Please reduce the length of the messages, top_k or max_tokens.",
                param="messages")
        req = GenRequest(inp.request_id, plan.rows, sampling, plan.logits_hook)
        return Prepared(inp, plan, req, t0, (time.perf_counter() - t0) * 1e3)

    def start(self, prepared: Prepared) -> EventStream:
        """Submit to the engine; raises QueueFull / EngineUnavailable at once, not mid-stream."""
        return EventStream(self.engine, prepared.request)
