"""CK-PLUG: knowledge-preference control by Confidence Gain (Bi et al., 2025,
"Parameters vs. Context: Fine-Grained Control of Knowledge Reliance in Language Models",
arXiv 2503.15888).

Per decoding step, with p_c = p(x | context + query) and p_p = p(x | query) the
next-token distributions with and without the retrieved context. The ``paper`` variant
(the default) is the paper's equations as written:

    (3, 4)  H_c = H(p_c), H_p = H(p_p) over the whole vocabulary; CG = H_p - H_c
    (5, 6)  q_para = log p_p;  q_cont = log p_c - log p_p
    (7, 11) where CG < epsilon * |H_c| (epsilon = 0: the paper's CG < 0; the appendix's
            extension takes epsilon < 0, -1 for Llama-3-8B):
                p^ = softmax(F),  F = alpha * q_para + (1 - alpha) * q_cont  on V_head, -inf elsewhere
            otherwise p^ = p_c, untouched
    (9)     V_head = the top-k tokens of q_para  U  the top-k tokens of q_cont (k = HEAD_K)
    (10)    adaptive: alpha = H_c / (H_p + H_c)

alpha -> 1 trusts memory, alpha -> 0 trusts the context. CG and the conditions compare
entropies with entropies, so the log base (the paper's bits, our nats) cancels.

The ``kept-set`` variant is knowmux's first implementation, kept for comparison (see
bench/RESULTS.md): tokens within min(max + ln 0.01, the 10th best) of either
distribution's top form the kept set; entropies are over the two distributions
renormalised on it; every step, reweighted or not, is cut to it; adaptive uses
    nf = 1 + |H_c - H_p| / (H_c + H_p),
    z  = [2 H_c / (H_c + H_p nf)] * q_para + [2 H_p / (H_c + H_p nf)] * q_cont
(weights that do not sum to 1). The ``code`` condition, CG < H_c, is the released code's.
Temperature, if any, is applied by the sampler after this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Union

import torch

LN_001 = math.log(0.01)
TOP_N = 10  # kept-set: the plausibility filter's rank
HEAD_K = 10  # paper: V_head's top-k of each of q_para and q_cont (Eq. 9; the paper gives no k)
CONDITIONS = ("paper", "code")  # CG < epsilon |H_c| (epsilon 0: CG < 0), or the released code's CG < H_c
VARIANTS = ("paper", "kept-set")


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
                condition: str = "paper", epsilon: float = 0.0, variant: str = "paper") -> StepResult:
    """z_c, z_p: [vocab] logits with and without context; alpha in [0, 1] or "adaptive";
    ``epsilon`` (<= 0) scales the paper condition's threshold. Returns the step's logits
    (log-probabilities; -inf outside V_head where reweighted) and what decided them."""
    if variant == "kept-set":
        return _kept_set_step(z_c, z_p, alpha, condition)
    lc = torch.log_softmax(z_c.float(), dim=-1)
    lp = torch.log_softmax(z_p.float(), dim=-1)
    h_c, h_p = _entropy(lc), _entropy(lp)
    cg = h_p - h_c
    if not (cg < epsilon * abs(h_c) if condition == "paper" else cg < h_c):
        return StepResult(lc, cg, h_c, h_p, False)  # p_c untouched (Eq. 7, otherwise)
    if alpha == "adaptive":
        a = h_c / (h_p + h_c) if h_p + h_c > 0 else 0.5  # Eq. 10
    else:
        a = float(alpha)
    q_para = lp
    q_cont = torch.nan_to_num(lc - lp, nan=float("-inf"))  # a token impossible in both is never in the head
    k = min(HEAD_K, q_para.shape[-1])
    head = torch.zeros_like(q_para, dtype=torch.bool)
    head[q_para.topk(k).indices] = True
    head[q_cont.topk(k).indices] = True
    z = a * q_para + (1 - a) * q_cont
    return StepResult(torch.where(head, z, torch.full_like(z, float("-inf"))), cg, h_c, h_p, True)


def _entropy(logp: torch.Tensor) -> float:
    """The entropy of a whole distribution given as log-probabilities (0 log 0 = 0)."""
    p = logp.exp()
    return float(-(p * torch.where(p > 0, logp, torch.zeros_like(logp))).sum())


def _kept_set_step(z_c: torch.Tensor, z_p: torch.Tensor, alpha: Union[float, str], condition: str) -> StepResult:
    """knowmux's first implementation (the ``kept-set`` variant; see the module docstring)."""
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


@dataclass
class CKPlugHook:
    """The engine's logits hook for a request with rows [with context, without context].
    Records a per-token trace when asked."""

    alpha: Union[float, str] = "adaptive"
    condition: str = "paper"
    epsilon: float = 0.0
    variant: str = "paper"
    record: bool = False
    trace: list = field(default_factory=list)
    reweighted: int = 0
    steps: int = 0

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        r = ckplug_step(logits[0], logits[1], self.alpha, self.condition, self.epsilon, self.variant)
        self.steps += 1
        self.reweighted += r.reweighted
        if self.record:
            self.trace.append({"cg": round(r.cg, 5), "reweighted": r.reweighted})
        return r.logits

    def summary(self) -> dict:
        out = {"alpha": self.alpha, "condition": self.condition, "epsilon": self.epsilon, "variant": self.variant,
               "steps": self.steps, "reweighted": self.reweighted}
        if self.record:
            out["trace"] = self.trace
        return out

