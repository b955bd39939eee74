"""CK-PLUG: knowledge-preference control by Confidence Gain (Bi et al., 2025,
"Parameters vs. Context: Fine-Grained Control of Knowledge Reliance in Language Models").

Per decoding step, with z_c the logits given the retrieved context and z_p the logits
without it (both turned into log-probabilities over the whole vocabulary first; a
per-distribution constant does not change the result after softmax):

1. Plausibility filter: a token is kept if, in either distribution, its log-prob is at
   least min(max + ln 0.01, the 10th best log-prob). Everything else is masked in both
   distributions and in the result.
2. H_c, H_p: entropies of the two distributions renormalised over the kept set.
   Confidence Gain CG = H_p - H_c (positive when the context makes the model surer).
3. Where the condition holds (the paper: CG < 0; the released code: CG < H_c):
       fixed alpha:  z = alpha * z_p + (1 - alpha) * (z_c - z_p)
       adaptive:     nf = 1 + |H_c - H_p| / (H_c + H_p)
                     z  = [2 H_c / (H_c + H_p nf)] * z_p + [2 H_p / (H_c + H_p nf)] * (z_c - z_p)
   elsewhere z = z_c. alpha -> 1 trusts memory, alpha -> 0 trusts the context, and
   alpha = 0.5 gives z = z_c / 2, the plain `rag` argmax.
Temperature, if any, is applied by the sampler after this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch

LN_001 = math.log(0.01)
TOP_N = 10
CONDITIONS = ("paper", "code")


@dataclass(frozen=True)
class StepResult:
    logits: torch.Tensor  # [vocab], -inf outside the kept set
    cg: float
    h_context: float
    h_memory: float
    reweighted: bool


def _entropy_over(logp: torch.Tensor, keep: torch.Tensor) -> float:
    lp = torch.where(keep, logp, torch.full_like(logp, float("-inf")))
    lp = lp - torch.logsumexp(lp, dim=-1)
    p = lp.exp()
    return float(-(p[keep] * lp[keep]).sum())


def plausible(logp: torch.Tensor, top_n: int = TOP_N) -> torch.Tensor:
    """Tokens whose log-prob >= min(max + ln 0.01, the top_n-th best): bool [vocab]."""
    n = min(top_n, logp.shape[-1])
    threshold = min(float(logp.max()) + LN_001, float(logp.topk(n).values[-1]))
    return logp >= threshold


def ckplug_step(z_c: torch.Tensor, z_p: torch.Tensor, alpha: Union[float, str] = "adaptive",
                condition: str = "paper") -> StepResult:
    """z_c, z_p: [vocab] logits with and without context. alpha in [0, 1] or "adaptive"."""
    lc = torch.log_softmax(z_c.float(), dim=-1)
    lp = torch.log_softmax(z_p.float(), dim=-1)
    keep = plausible(lc) | plausible(lp)
    h_c, h_p = _entropy_over(lc, keep), _entropy_over(lp, keep)
    cg = h_p - h_c
    adjust = cg < 0 if condition == "paper" else cg < h_c
    if not adjust:
        z = lc
    elif alpha == "adaptive":
        denom = h_c + h_p
        nf = 1 + abs(h_c - h_p) / denom if denom > 0 else 1.0
        scale = h_c + h_p * nf
        if scale <= 0:  # both distributions are one-hot over the kept set: nothing to weigh
            z, adjust = lc, False
        else:
            z = (2 * h_c / scale) * lp + (2 * h_p / scale) * (lc - lp)
    else:
        a = float(alpha)
        z = a * lp + (1 - a) * (lc - lp)
    z = torch.where(keep, z, torch.full_like(z, float("-inf")))
    return StepResult(z, cg, h_c, h_p, bool(adjust))


def parse_alpha(value) -> Union[float, str]:
    """The request's ckplug_alpha: a number in [0, 1] or "adaptive"; raises ValueError."""
    if value is None or value == "adaptive":
        return "adaptive"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0 \
            or math.isnan(float(value)):
        raise ValueError('ckplug_alpha must be a number between 0 and 1, or "adaptive"')
    return float(value)


@dataclass
class CKPlugHook:
    """The engine's logits hook for a request with rows [with context, without context].
    Records a per-token trace when asked."""

    alpha: Union[float, str] = "adaptive"
    condition: str = "paper"
    record: bool = False
    trace: list = field(default_factory=list)
    reweighted: int = 0
    steps: int = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        r = ckplug_step(logits[0], logits[1], self.alpha, self.condition)
        self.steps += 1
        self.reweighted += r.reweighted
        if self.record:
            self.trace.append({"cg": round(r.cg, 5), "reweighted": r.reweighted})
        return r.logits

    def summary(self) -> dict:
        out = {"alpha": self.alpha, "condition": self.condition, "steps": self.steps, "reweighted": self.reweighted}
        if self.record:
            out["trace"] = self.trace
        return out

