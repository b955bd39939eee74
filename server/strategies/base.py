"""The strategy interface: a request in, a plan for the engine out.

A strategy retrieves what it needs and lays out the engine rows; it never runs the
model itself. ``plan`` is synchronous (embedding and tokenising are CPU work) and the
pipeline calls it off the event loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Mapping, Optional

from ..engine.types import LogitsHook, RowSpec, SamplingParams

if TYPE_CHECKING:  # annotations only: no import of the knowledge base or the KV service here
    from indexes import KnowledgeBase

    from ..kv.service import KVService
    from ..prompt import PromptBuilder


@dataclass(frozen=True)
class Query:
    request_id: str
    messages: list[dict]  # [{"role", "content": str}], as sent
    question: str  # the last user message: what retrieval searches for
    top_k: int
    sampling: SamplingParams
    options: dict = field(default_factory=dict)  # strategy-specific request fields (ckplug_alpha, ...)
    # hits already searched for this question (by the router), best first: retrieval reuses them
    hits: Optional[list] = None


@dataclass
class Retrieved:
    doc_id: str
    score: float
    title: str = ""


@dataclass
class Plan:
    strategy: str
    rows: list[RowSpec]
    retrieved: list[Retrieved] = field(default_factory=list)
    logits_hook: Optional[LogitsHook] = None
    timings_ms: dict[str, float] = field(default_factory=dict)  # e.g. {"retrieve": 12.3}
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for the response's knowmux object
    # called once the request has finished; its fields join the knowmux object (e.g. a decoding trace)
    report: Optional[Callable[[], dict]] = None


@dataclass(frozen=True)
class StrategyContext:
    """What strategies may use."""

    kb: Optional["KnowledgeBase"]  # None when not configured
    prompts: "PromptBuilder"
    kv: Optional["KVService"] = None  # when the engine injects KV prefixes and a data folder is set
    # the server's defaults of `kv`'s options (kv_recompute, kv_link_tokens, kv_positions,
    # kv_temperature, kv_scale; server.config.Settings), for a request that does not set them
    kv_defaults: Mapping[str, Any] = field(default_factory=dict)
    prag: Optional[Any] = None  # server.prag.PragService, or server.prag_vllm.VLLMPragService on vLLM


class Strategy:
    name: ClassVar[str]
    needs_documents: ClassVar[bool] = False
    # what the runtime must offer: engine capabilities (server.engine: "logits_hook", ...)
    # and artefact services (server.artefacts: "kv", "adapters"); see strategies.supported
    requires: ClassVar[frozenset[str]] = frozenset()

    def plan(self, query: Query, ctx: StrategyContext) -> Plan:  # pragma: no cover - interface
        raise NotImplementedError
