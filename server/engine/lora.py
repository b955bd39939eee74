"""Low-rank deltas applied per row beside the base linear layers.

An ``AdapterSet`` holds, for some projections of some layers, a pair (A, B) with
A of shape [r, in_features] and B of shape [out_features, r] such that the row's
projection becomes ``y = x W^T + (x A^T) B^T``. The scale (alpha / r times the
per-request scale) is folded into B when the set is built. Several adapters combine
as the exact sum of their deltas by concatenating along r:
    sum_i s_i B_i A_i = [s_1 B_1 | ... | s_k B_k] @ [A_1; ...; A_k]
which is what peft's ``cat`` combination computes. The base weights are never touched,
so rows with different sets share one forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The projections the engine can apply deltas to (Llama-family names).
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class AdapterSet:
    """deltas[(layer, projection)] = (A [r, in], B_scaled [out, r])."""

    deltas: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    name: str = ""

    @staticmethod
    def combine(sets: list["AdapterSet"], scales: list[float] | None = None) -> "AdapterSet":
        """Exact sum of deltas: concatenate A along rows and scale*B along columns."""
        scales = scales or [1.0] * len(sets)
        keys = sorted({k for s in sets for k in s.deltas})
        out: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        for key in keys:
            parts = [(s.deltas[key], sc) for s, sc in zip(sets, scales) if key in s.deltas]
            a = torch.cat([p[0][0] for p in parts], dim=0)
            b = torch.cat([p[0][1] * p[1] for p in parts], dim=1)
            out[key] = (a, b)
        return AdapterSet(out, name="+".join(s.name for s in sets))

    def get(self, layer: int, projection: str):
        return self.deltas.get((layer, projection))


def apply_deltas(y: torch.Tensor, x: torch.Tensor, segments, layer: int, projection: str) -> None:
    """Add each row's delta in place: y[s:e] += (x[s:e] A^T) B^T.

    y: [T, out], x: [T, in] (the packed tokens of the step); segments: the step's
    ``Segment`` list, each with ``start``, ``n`` and ``adapters`` (or None).
    """
    for seg in segments:
        if seg.adapters is None:
            continue
        ab = seg.adapters.get(layer, projection)
        if ab is None:
            continue
        a, b = ab
        s, e = seg.start, seg.start + seg.n
        y[s:e] += (x[s:e] @ a.T) @ b.T
