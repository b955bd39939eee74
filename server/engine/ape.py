"""APE's attention over independently encoded passages (Yang, Chen and Chen, "APE: Faster and
Longer Context-Augmented Generation via Adaptive Parallel Encoding", ICLR 2025).

A row whose cache holds a shared head, then passages encoded apart, then its own tokens
(question, answer) attends from its own tokens in three parts, as the paper's released
code does: with a = q k^T / sqrt(D) (causal within the row's own tokens),

    lse_head = logsumexp(a_head)
    lse_ctx  = T * logsumexp(a_ctx / T) + ln S          (T: attention temperature, S: scale)
    lse_own  = logsumexp(a_own)
    out = sum_p softmax([lse_head, lse_ctx, lse_own])_p * o_p,
    o_head = softmax(a_head) V_head,  o_ctx = softmax(a_ctx / T) V_ctx,  o_own = softmax(a_own) V_own.

That is one softmax over adjusted logits: the passages' keys get a/T + ln S + (T - 1) lse(a_ctx/T)
and the others keep a, which is how ``attend`` computes it. T = S = 1 is plain attention. The
paper also places every passage at the positions it was encoded at (all right after the
head) and the row's own tokens after the longest: the KV strategy's ``kv_positions: parallel``,
which is a rotation of the stored keys when they are joined (server.kv.service), not an
engine matter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelContext:
    """Where a row's independently encoded passages sit in its cache (slots ``start``..``end``-1,
    after the head), and APE's two knobs."""

    start: int
    end: int
    temperature: float = 1.0
    scale: float = 1.0

    @property
    def reweights(self) -> bool:
        """T or S away from 1: the row needs ``attend``; otherwise its attention is plain (and
        may be batched with other rows)."""
        return self.temperature != 1.0 or self.scale != 1.0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, ctx: ParallelContext, past: int) -> torch.Tensor:
    """Queries q [H, n, D] at cache slots past..past+n-1 (all at or after ``ctx.end``) over
    keys and values [Hkv, past+n, D]; returns [H, n, D] in q's dtype."""
    H, n, D = q.shape
    if k.shape[0] != H:  # grouped-query attention: each KV head serves H/Hkv query heads
        k, v = k.repeat_interleave(H // k.shape[0], 0), v.repeat_interleave(H // v.shape[0], 0)
    a = (q.float() @ k.float().transpose(1, 2)) / math.sqrt(D)  # [H, n, past+n]
    s, e = ctx.start, ctx.end
    if e > s:
        t = ctx.temperature
        docs = a[..., s:e] / t
        a[..., s:e] = docs + (math.log(ctx.scale) + (t - 1.0) * torch.logsumexp(docs, -1, keepdim=True))
    if n > 1:  # query i sees its own tokens up to slot past+i
        hidden = torch.ones(n, past + n, dtype=torch.bool, device=q.device).triu(diagonal=past + 1)
        a = a.masked_fill(hidden, float("-inf"))
    return (torch.softmax(a, -1) @ v.float()).to(q.dtype)
