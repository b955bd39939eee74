"""OpenAI wire shapes (pydantic only here, at the edge). Unknown fields are kept in
``model_extra`` and logged, as vLLM does; knowmux's own fields are extras too."""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr

from ..errors import ModelNotFound


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: StrictStr


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[StrictStr, list[TextPart]]] = None
    name: Optional[StrictStr] = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


def check_model(model: Optional[str], served: str) -> None:
    """A request naming a model must name the one served (``None``: the field is optional)."""
    if model is not None and model != served:
        raise ModelNotFound(f"The model {model!r} does not exist; this server serves {served!r}", param="model")


def template_messages(messages: list[ChatMessage]) -> list[dict]:
    """Messages as a chat template takes them: text content; OpenAI's developer role is the
    system role."""
    return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in messages]


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = 1
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[int] = None
    user: Optional[StrictStr] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, OpenAI's shape) -> -100..100
    # knowmux extensions (OpenAI extra_body)
    strategy: Optional[StrictStr] = None
    strategies: Optional[list[StrictStr]] = None  # one choice per strategy, generated in one batch
    top_k: Optional[int] = None
    ignore_eos: bool = False  # as in vLLM: for benchmarks that need fixed-length outputs
    # CK-PLUG (rag+ckplug): validated by the strategy, so that errors name the field
    ckplug_alpha: Any = None  # a number in [0, 1] or "adaptive" (default)
    ckplug_condition: Optional[StrictStr] = None  # "paper" (CG < 0, default) or "code" (CG < H_c)
    ckplug_trace: Optional[bool] = None
    # what a strategy does with a retrieved document whose stored artefact (KV cache) is missing
    on_missing: Optional[Literal["build", "skip", "error"]] = None
    kv_recompute: Optional[float] = None  # kv: CacheBlend fraction of passage tokens to recompute
    adapters: Optional[list[Any]] = None  # prag: [{"doc_id", "scale"}] instead of retrieval (llama.cpp's "lora")

    def strategy_options(self) -> dict:
        """The strategy options the request sets, as sent. ``None`` alone means "not given":
        a 0, 0.0, False or "" is a value (``0 == False`` in Python, so a truthiness or
        ``in (None, False)`` filter would turn ``ckplug_alpha: 0`` into the default)."""
        return {k: getattr(self, k) for k in STRATEGY_OPTIONS if getattr(self, k) is not None}


# the request fields that travel to the strategy in Query.options
STRATEGY_OPTIONS = ("ckplug_alpha", "ckplug_condition", "ckplug_trace", "on_missing", "kv_recompute", "adapters")


KNOWN_IGNORED = {"response_format", "tools", "tool_choice", "parallel_tool_calls", "metadata", "store",
                 "service_tier"}


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="allow")
    id: Union[StrictStr, int]
    text: Optional[StrictStr] = None
    title: Optional[StrictStr] = None


class DocumentsRequest(BaseModel):
    documents: list[DocumentIn] = Field(min_length=1)
    build: list[Literal["kv", "adapters"]] = Field(default_factory=list)  # artefacts to build in a background job


class RetrieveRequest(BaseModel):
    query: StrictStr = Field(min_length=1)
    top_k: int = 3


class TokenizeRequest(BaseModel):
    """vLLM's /tokenize: a ``prompt`` as it is, or ``messages`` as the chat template renders
    them (the prompt ``direct`` prefills)."""

    model: Optional[StrictStr] = None
    prompt: Optional[StrictStr] = None
    messages: Optional[list[ChatMessage]] = Field(default=None, min_length=1)
    add_special_tokens: bool = True  # for ``prompt``


class DetokenizeRequest(BaseModel):
    model: Optional[StrictStr] = None
    tokens: list[int] = Field(max_length=1_000_000)


class BuildRequest(BaseModel):
    kind: Literal["kv", "adapters"]
    doc_ids: list[StrictStr] = Field(min_length=1, max_length=100_000)
