"""A request in the torch engine: its rows (each with a KV cache and the tokens still to
feed), what it generated, its sampling state and its times; and the handle that cancels it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from .detok import IncrementalDetokenizer
from .kvcache import RowCache
from .recompute import Recompute
from .types import GenRequest, RowSpec, Sink


@dataclass(eq=False)
class Row:
    spec: RowSpec
    cache: RowCache
    pending: list[int]
    recompute: Optional[Recompute] = None  # goes with the row's first prefill chunk, then None


@dataclass(eq=False)  # identity: the running list removes exactly this sequence
class Sequence:
    req: GenRequest
    sink: Sink
    detok: IncrementalDetokenizer
    generator: Optional[torch.Generator]
    t_submit: float
    rows: list[Row] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    cancelled: bool = False
    done: bool = False
    t_admit: float = 0.0
    t_first: float = 0.0
    cached_tokens: int = 0  # prompt tokens served by the prefix cache

    @property
    def prompt_tokens(self) -> int:
        r = self.req.rows[0]
        return len(r.prompt_ids) + (r.prefix.length if r.prefix is not None else 0)


class Handle:
    """What ``submit`` returns: lets the caller cancel (thread-safe, idempotent)."""

    def __init__(self, wake: Callable[[], None], seq: Sequence):
        self._wake, self._seq = wake, seq

    def cancel(self) -> None:
        if not self._seq.done:
            self._seq.cancelled = True
            self._wake()
