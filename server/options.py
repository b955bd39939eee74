"""The knowmux request options a chat request (OpenAI ``extra_body``) or an experiment arm
may set, with their ranges, declared once. pydantic, no torch: the HTTP layer
(server.api.protocol) extends this model, and the experiments file is checked against it."""

from __future__ import annotations

import math
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, Field, StrictBool, field_validator

def parse_alpha(value) -> Union[float, str]:
    """A ckplug_alpha as the hook takes it: a number in [0, 1] as a float, or "adaptive"
    (also for None: the default); raises ValueError otherwise. The one check of the value,
    for requests, experiment arms and the strategy alike."""
    if value is None or value == "adaptive":
        return "adaptive"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or not 0 <= value <= 1:
        raise ValueError('ckplug_alpha must be a number between 0 and 1, or "adaptive"')
    return float(value)


# `kv`'s options that the server also has defaults for (server.config.Settings, same names)
KV_OPTIONS = ("kv_recompute", "kv_recompute_refresh", "kv_link_tokens", "kv_positions", "kv_temperature", "kv_scale")
# the options that travel to the strategy in Query.options (top_k travels on its own)
STRATEGY_OPTIONS = ("ckplug_alpha", "ckplug_condition", "ckplug_epsilon", "ckplug_variant", "ckplug_trace",
                    "on_missing", *KV_OPTIONS, "adapters")


class RequestOptions(BaseModel):
    top_k: Optional[int] = Field(default=None, ge=1)  # up to the server's max_top_k (checked by the pipeline)
    # CK-PLUG (+ckplug strategies)
    ckplug_alpha: Any = None  # a number in [0, 1] or "adaptive" (default)
    # "paper" (CG < epsilon |H_c|, default) or "code" (the released code's CG < H_c)
    ckplug_condition: Optional[Literal["paper", "code"]] = None
    # the paper's appendix threshold, CG < epsilon |H_c| (default 0: CG < 0); as printed, with
    # entropies >= 0 that is H_p < (1 + epsilon) H_c, so epsilon <= -1 never reweights
    ckplug_epsilon: Optional[float] = Field(default=None, le=0.0)
    # "paper": the paper's equations (default); "kept-set": knowmux's first implementation
    ckplug_variant: Optional[Literal["paper", "kept-set"]] = None
    ckplug_trace: Optional[bool] = None
    # what a strategy does with a retrieved document whose stored artefact (KV cache) is missing
    on_missing: Optional[Literal["build", "skip", "error"]] = None
    kv_recompute: Optional[float] = Field(default=None, ge=0.0, le=1.0)  # kv: CacheBlend fraction recomputed
    # kv: CacheBlend's tokens chosen again at every layer (its gradual filtering), not at layer 1 only
    kv_recompute_refresh: Optional[StrictBool] = None
    # kv: the first N tokens of every passage after the first recomputed against the joined
    # cache (EPIC's LegoLink: the attention-sink tokens independent encoding corrupts)
    kv_link_tokens: Optional[int] = Field(default=None, ge=0, le=4096)
    # kv, APE (server.engine.ape): the passages' positions (re-rotated one after another, or
    # all where they were encoded, right after the head), and the attention temperature and
    # scale of the question's and answer's attention to them
    kv_positions: Optional[Literal["sequential", "parallel"]] = None
    kv_temperature: Optional[float] = Field(default=None, gt=0.0, le=2.0)
    kv_scale: Optional[float] = Field(default=None, gt=0.0, le=2.0)
    adapters: Optional[list[Any]] = None  # prag: [{"doc_id", "scale"}] instead of retrieval (llama.cpp's "lora")

    @field_validator("ckplug_alpha")
    @classmethod
    def _alpha(cls, v):
        parse_alpha(v)
        return v  # as sent: the strategy parses it again into the hook's value

    def strategy_options(self) -> dict:
        """The strategy options the request sets, as sent. ``None`` alone means "not given":
        a 0, 0.0, False or "" is a value (``0 == False`` in Python, so a truthiness or
        ``in (None, False)`` filter would turn ``ckplug_alpha: 0`` into the default)."""
        return {k: getattr(self, k) for k in STRATEGY_OPTIONS if getattr(self, k) is not None}
