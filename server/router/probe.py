"""The router's confidence probe: does putting the retrieved passages in the prompt make
the model more or less sure of its first token?

One engine request of two rows (with and without the passages, the layout rag+ckplug
uses) and one generated token; the logits hook computes CK-PLUG's confidence gain
CG = H(without) - H(with) (server.decoding.ckplug, the paper's variant). It shares the running batch with
live traffic, and the with-context prompt's blocks land in the prefix cache, so a rag
request that follows re-uses most of that prefill.
"""

from __future__ import annotations

import time

from ..decoding.ckplug import ckplug_step
from ..engine.aio import generate_blocking
from ..engine.types import GenRequest, RowSpec, SamplingParams


class ConfidenceProbe:
    def __init__(self, engine, prompts, timeout_s: float = 60.0):
        self.engine, self.prompts, self.timeout_s = engine, prompts, timeout_s

    def __call__(self, messages: list[dict], passages: list) -> float:
        seen: list[float] = []

        def hook(logits):
            r = ckplug_step(logits[0], logits[1], 0.5, "paper")
            seen.append(r.cg)
            return logits[0]

        rows = [RowSpec(self.prompts.with_passages(messages, passages).ids),
                RowSpec(self.prompts.with_passages(messages, []).ids)]
        req = GenRequest(f"probe-{time.monotonic_ns()}", rows, SamplingParams(max_tokens=1, ignore_eos=True), hook)
        generate_blocking(self.engine, req, timeout=self.timeout_s)
        return seen[0]
