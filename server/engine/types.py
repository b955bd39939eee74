"""The small typed objects the engine takes and gives.

A strategy turns a chat request into a ``GenRequest``: one or more rows (token ids,
optionally an injected KV prefix and a low-rank adapter set) and sampling settings.
Row 0 is the row whose text is returned; extra rows (CK-PLUG's without-context
stream) exist only to feed ``logits_hook``. The engine answers with ``TokenEvent``s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Optional

from ..errors import InvalidRequest

if TYPE_CHECKING:  # torch stays out of modules that only need the types
    import torch

    from .kvcache import KVPrefix
    from .lora import AdapterSet
    from .recompute import Recompute


@dataclass(frozen=True)
class SamplingParams:
    # None (a request that set none): as many as fit, up to the server's default; the
    # pipeline resolves it before a GenRequest reaches an engine
    max_tokens: Optional[int] = None
    temperature: Optional[float] = 0.0  # 0 means greedy; None (a request that set none): the pipeline's default
    top_p: Optional[float] = 1.0  # None: likewise
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    logprobs: Optional[int] = None  # None: none; k >= 0: each token's logprob and the k most likely
    presence_penalty: float = 0.0  # OpenAI's: subtracted from every token already generated
    frequency_penalty: float = 0.0  # OpenAI's: subtracted once per time a token was generated
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, added to its logit)

    def check_vocabulary(self, vocab_size: int) -> None:
        """Refuse a logit bias on a token id the model does not have (an engine's guard)."""
        if any(not 0 <= t < vocab_size for t, _ in self.logit_bias):
            raise InvalidRequest(f"logit_bias names a token id outside this model's vocabulary "
                                 f"(0..{vocab_size - 1})", param="logit_bias")


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the distribution it was drawn from (after
    a logits hook such as CK-PLUG's; before logit bias, penalties, temperature and top-p, as
    vLLM's raw logprobs), and the ``top`` most likely tokens of that distribution, best first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class RowSpec:
    """One row of the running batch: the tokens to prefill and what is injected."""

    prompt_ids: list[int]
    prefix: Optional["KVPrefix"] = None  # KV imported before prompt_ids (positions 0..len-1)
    adapters: Optional["AdapterSet"] = None  # low-rank deltas applied to this row only
    # tokens of the prefix recomputed in the row's first prefill step (CacheBlend, LegoLink)
    recompute: Optional["Recompute"] = None


# logits_hook(logits) -> logits: logits is [n_rows, vocab] float32 (one line per row of
# the request, same order as GenRequest.rows), the result is [vocab]. It must be a
# pure function: it is called on the engine thread once per generated token.
LogitsHook = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class GenRequest:
    request_id: str
    rows: list[RowSpec]
    sampling: SamplingParams
    logits_hook: Optional[LogitsHook] = None
    # background work (an adapter build's augmentation): while live requests run, its rows
    # advance at most once per the worker's background interval, as training pieces do
    background: bool = False

    @property
    def kv_tokens_needed(self) -> int:
        """KV slots the request can occupy at most: every row's prefix + prompt + output."""
        return sum(
            (r.prefix.length if r.prefix is not None else 0) + len(r.prompt_ids) + self.sampling.max_tokens
            for r in self.rows
        )


@dataclass
class Timings:
    queued_ms: float = 0.0  # submit -> admitted into the running batch
    prefill_ms: float = 0.0  # admitted -> first token sampled
    decode_ms: float = 0.0  # first token -> finish
    ttft_ms: float = 0.0  # submit -> first token

    @classmethod
    def between(cls, submit: float, admit: float, first: float, end: float) -> "Timings":
        """From perf_counter() instants (seconds) of a request's life."""
        return cls(queued_ms=(admit - submit) * 1e3, prefill_ms=(first - admit) * 1e3,
                   decode_ms=(end - first) * 1e3, ttft_ms=(first - submit) * 1e3)


@dataclass
class TokenEvent:
    """A piece of output. ``finish_reason`` is set on the last event of a request."""

    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None  # "stop" | "length" | "cancelled" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    timings: Optional[Timings] = None
    error: Optional[str] = None
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (not prefilled)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token_ids entry, when asked for


Sink = Callable[["TokenEvent"], None]  # receives a request's events on the engine thread


@dataclass(frozen=True)
class WorkerLimits:
    max_batch_size: int = 16  # sequences in the running batch
    max_tokens_in_flight: int = 32768  # KV slots reserved by running rows (46 KB each on SmolLM2 fp32)
    max_queue: int = 64  # sequences waiting for admission; more get QueueFull (429)
    step_token_budget: int = 512  # tokens per forward pass (prefill chunk size)
    prefix_cache_tokens: int = 16384  # automatic prefix cache (0 = off); 46 KB per token on SmolLM2 fp32
    prefix_cache_block: int = 16  # tokens per prefix-cache block (a prompt shares whole blocks only)
    background_interval_s: float = 1.0  # while requests run, at most one background call (a training step) per interval
    # KV slot size of the shared pool (2 slots per batch place); a longer row gets a private cache
    pool_row_tokens: int = 2048
