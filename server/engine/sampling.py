"""Choosing the next token from a logits vector. Kept tiny on purpose."""

from __future__ import annotations

from typing import Optional

import torch

from .types import SamplingParams, TokenLogprob


def adjust(logits: torch.Tensor, params: SamplingParams, output: list[int]) -> torch.Tensor:
    """OpenAI's logit_bias, then presence and frequency penalties over the tokens generated
    so far (``output``), as vLLM applies them; ``logits`` itself is left as it is."""
    if not (params.logit_bias or (output and (params.presence_penalty or params.frequency_penalty))):
        return logits
    out = logits.clone()
    if params.logit_bias:
        ids, bias = zip(*params.logit_bias)
        out[list(ids)] += torch.tensor(bias, dtype=out.dtype, device=out.device)
    if output and (params.presence_penalty or params.frequency_penalty):
        ids, counts = torch.unique(torch.tensor(output, device=out.device), return_counts=True)
        out[ids] -= params.frequency_penalty * counts.to(out.dtype) + params.presence_penalty
    return out


def sample(logits: torch.Tensor, params: SamplingParams, generator: Optional[torch.Generator]) -> int:
    """logits: [vocab] float32 (masked entries may be -inf). Greedy when temperature == 0;
    otherwise temperature, then nucleus (top-p) filtering, then a draw from ``generator``."""
    if params.temperature <= 0.0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        drop = torch.cumsum(sorted_p, dim=-1) - sorted_p >= params.top_p
        sorted_p[drop] = 0.0
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """``token``'s log-probability under softmax(logits) and the ``k`` most likely tokens."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = ()
    if k > 0:
        values, ids = torch.topk(lp, min(k, lp.numel()))
        top = tuple(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(lp[token]), top)
