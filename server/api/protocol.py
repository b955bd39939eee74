"""OpenAI wire shapes (pydantic only here, at the edge). Unknown fields are kept in
``model_extra`` and logged, as vLLM does; knowmux's own fields are extras too.

Every range a request field must fall in is declared here, once (``Field(ge=, le=)`` or a
field validator), so a bad value is a 400 naming the field before anything runs. What
depends on the server's settings (top_k up to ``max_top_k``, max_tokens up to
``max_tokens_limit``, the model's context) is checked by the pipeline, which knows them.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictStr, field_validator

from ..errors import ModelNotFound
from ..options import RequestOptions


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


MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default max_logprobs
MAX_CHOICES = 8  # n, or the strategies compared in one request


class ChatCompletionRequest(RequestOptions):
    model_config = ConfigDict(extra="allow")
    model: StrictStr
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(default=None, ge=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    # not given: the server's --default-temperature/--default-top-p, else the model's
    # generation_config, else OpenAI's 1.0 (server.sampling_defaults)
    temperature: Optional[float] = Field(default=None, ge=0.0, le=2.0)
    top_p: Optional[float] = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    seed: Optional[int] = None
    user: Optional[StrictStr] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: Optional[dict[str, float]] = None  # token id (as a string, OpenAI's shape) -> -100..100
    # knowmux extensions (OpenAI extra_body); the strategy options are RequestOptions'
    strategy: Optional[StrictStr] = None
    # one choice per strategy, generated in one batch
    strategies: Optional[list[StrictStr]] = Field(default=None, min_length=1, max_length=MAX_CHOICES)
    ignore_eos: bool = False  # as in vLLM: for benchmarks that need fixed-length outputs

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v):
        for key, value in (v or {}).items():
            if not (key.isascii() and key.isdigit()) or not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias maps token ids (as strings) to numbers in -100..100; got {key!r}: "
                                 f"{value!r}")
        return v


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
