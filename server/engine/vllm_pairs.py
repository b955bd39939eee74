"""Paired rows on the vLLM engine: a request's logits hook (CK-PLUG, the router's probe)
over two vLLM requests decoded together.

A knowmux request with two rows (row 0 with the context, row 1 without) becomes two vLLM
requests whose SamplingParams carry ``extra_args = {"knowmux_pair": id, "knowmux_row": 0|1}``.
``PairedRows`` is a V1 batch-level logits processor: vLLM tells it which batch index holds
which request (``update_state``), and at each step (``apply``) it finds the two rows of
every registered pair, calls the pair's hook on their stacked logits ([2, vocab] float32,
row 0 first, as the torch engine does) and writes the hook's result into both rows. Both
rows then sample from the same distribution with the same seed, so they choose the same
token, and each row's next step is conditioned on it: the without-context row follows
the with-context row's text, as the torch engine's shared-token rows do.

vLLM is not told the rows belong together, so the processor and the engine check it at
every step instead of assuming it: a step where only one row of a pair is in the batch,
or where the two have generated different numbers of tokens (one was preempted, or
prefilled in another step), marks the pair broken, and the engine then ends both rows
with an error before any token of that step is shown. The engine disables chunked
prefill and sizes the step's token budget so that a pair admitted together is prefilled
in one step together.

The hooks live in this process (``PAIRS``), so this works with vLLM's engine core in the
process (knowmux's ``LLMEngine``, one GPU); with tensor parallelism the sampler runs in
worker processes and the engine does not offer hooks.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

PAIR_KEY, ROW_KEY = "knowmux_pair", "knowmux_row"


@dataclass
class Pair:
    hook: Callable[[torch.Tensor], torch.Tensor]
    broken: Optional[str] = None  # why the rows stopped being one pair (the engine ends both)
    steps: int = 0  # hook calls


class PairRegistry:
    """Pair id -> Pair, shared by the engine thread (register, forget) and the processor
    (which runs on the same thread inside ``step()``, but the lock costs nothing)."""

    def __init__(self):
        self._pairs: dict[str, Pair] = {}
        self._lock = threading.Lock()

    def register(self, pair_id: str, hook) -> Pair:
        with self._lock:
            p = self._pairs[pair_id] = Pair(hook)
            return p

    def get(self, pair_id: str) -> Optional[Pair]:
        with self._lock:
            return self._pairs.get(pair_id)

    def forget(self, pair_id: str) -> None:
        with self._lock:
            self._pairs.pop(pair_id, None)

    def __len__(self) -> int:
        return len(self._pairs)


PAIRS = PairRegistry()


class PairedRows(LogitsProcessor):
    """The batch-level processor vLLM builds once per model runner (EngineArgs.logits_processors)."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[str, int, list[int]]] = {}  # batch index -> (pair id, row, its output tokens)

    def is_argmax_invariant(self) -> bool:
        return False  # it decides the greedy token

    @classmethod
    def validate_params(cls, params) -> None:
        extra = params.extra_args or {}
        if PAIR_KEY in extra and extra.get(ROW_KEY) not in (0, 1):
            raise ValueError(f"{ROW_KEY} must be 0 or 1")

    def update_state(self, batch_update: Optional[BatchUpdate]) -> None:
        if batch_update is None:
            return
        for i in batch_update.removed:
            self.rows.pop(i, None)
        for i, params, _prompt, output in batch_update.added:
            extra = params.extra_args or {}
            if PAIR_KEY in extra:
                self.rows[i] = (extra[PAIR_KEY], extra[ROW_KEY], output)
            else:
                self.rows.pop(i, None)  # an unpaired request took this index
        for a, b, how in batch_update.moved:
            ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
            if ra is not None:
                self.rows[b] = ra
            if how == MoveDirectionality.SWAP and rb is not None:
                self.rows[a] = rb

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        found: dict[str, list] = {}
        for i, (pair_id, row, output) in self.rows.items():
            found.setdefault(pair_id, [None, None])[row] = (i, output)
        for pair_id, (r0, r1) in found.items():
            pair = PAIRS.get(pair_id)
            if pair is None or pair.broken:
                continue
            if r0 is None or r1 is None:
                pair.broken = f"row {0 if r0 is None else 1} of the pair is not in this step's batch"
                continue
            if len(r0[1]) != len(r1[1]):
                pair.broken = f"the rows are at different tokens ({len(r0[1])} and {len(r1[1])} generated)"
                continue
            mixed = pair.hook(torch.stack([logits[r0[0]], logits[r1[0]]]).float())
            pair.steps += 1
            logits[r0[0]] = mixed.to(logits.dtype)
            logits[r1[0]] = mixed.to(logits.dtype)
        return logits
