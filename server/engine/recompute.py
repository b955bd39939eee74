"""Recomputing tokens of an injected prefix inside a step (CacheBlend, EPIC's LegoLink).

A `kv` row's prefix joins caches computed passage by passage: its tokens never attended
to the passages before theirs. A ``Recompute`` names tokens of that prefix to carry
through the layers again, against the joined cache, in the row's first prefill step:
they ride in front of the row's own tokens in the packed batch, so the linear layers
run once for them and every other row of the step (decodes included), and no request
holds the engine thread for a pass of its own.

- LegoLink: the first tokens of each passage after the first (``pinned``) are carried
  through every layer.
- CacheBlend: every non-exact token starts (layer 0 is recomputed for all, giving each
  its true layer-1 input); at layer 1 the ``keep[1]`` whose fresh keys and values deviate
  most from the stored ones (squared L2 over heads) carry on, the others keep their
  stored KV. With ``keep`` entries at later layers the set is narrowed again at each of
  them among the tokens still carried (CacheBlend's gradual filtering).

Each carried token writes its fresh K/V at its own position and attends to the cache up
to that position (with the fresh K/V of carried tokens before it); the row's own tokens
then attend to the result. A recompute that covers every non-exact token at every layer
reproduces a full prefill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import Segment


@dataclass(frozen=True)
class Recompute:
    """Tokens of a row's prefix recomputed in its first prefill step.

    ``ids[i]`` sits at cache position ``positions[i]`` (sorted, all inside the prefix).
    ``pinned`` flags, one per position, mark tokens that are never dropped (LegoLink's;
    empty: none). ``keep`` maps a layer to how many carried tokens stay from that layer
    on, pinned ones included, the others chosen by deviation; no entry: all stay."""

    ids: tuple[int, ...]
    positions: tuple[int, ...]
    pinned: tuple[bool, ...] = ()
    keep: dict = field(default_factory=dict, hash=False)  # {layer: count}

    def __post_init__(self):
        if len(self.ids) != len(self.positions) or (self.pinned and len(self.pinned) != len(self.ids)):
            raise ValueError("a recompute needs one token and one flag per position")
        if any(b <= a for a, b in zip(self.positions, self.positions[1:])):
            raise ValueError("recompute positions must be sorted and distinct")

    @property
    def tokens(self) -> int:
        """Tokens carried per layer: all of them without a narrowing, else the mean of the
        narrowed counts (one count for CacheBlend at layer 1; the average the gradual
        schedule keeps)."""
        if not self.keep:
            return len(self.ids)
        return int(round(sum(self.keep.values()) / len(self.keep)))

    def check(self, prefix_length: int) -> None:
        if self.positions and not 0 <= self.positions[0] <= self.positions[-1] < prefix_length:
            raise ValueError(f"recompute positions must lie inside the injected prefix of {prefix_length} tokens")


def plan(ids: list[int], exact_upto: int, fraction: float, link: list[int], refresh: bool,
         n_layers: int) -> Optional[Recompute]:
    """The recompute of a joined prefix of tokens ``ids`` whose first ``exact_upto`` are
    exact: ``link`` positions always (LegoLink) and ``fraction`` of the other non-exact
    tokens by deviation (CacheBlend). ``refresh``: re-select at every layer from 1 to
    L - 1 on a linear schedule that starts at 1.5x the target and ends at 0.5x (capped at
    the candidates), so the tokens carried per layer average the target (CacheBlend's
    gradual filtering, whose per-layer ratios the paper does not give: this schedule is
    knowmux's). None when nothing is recomputed."""
    n = len(ids)
    pinned = set(p for p in link if exact_upto <= p < n)
    free = n - exact_upto - len(pinned)
    m = int(round(fraction * (n - exact_upto))) if fraction > 0 else 0
    m = min(m, free)
    if not pinned and m <= 0:
        return None
    if m <= 0:  # LegoLink alone: the given tokens, nothing to choose
        pos = sorted(pinned)
        return Recompute(tuple(ids[p] for p in pos), tuple(pos), tuple(True for _ in pos))
    pos = list(range(exact_upto, n))
    keep = {1: len(pinned) + m}
    if refresh and n_layers > 2:
        first = min(free, round(1.5 * m))
        last = max(0, 2 * m - first)
        steps = n_layers - 2  # layers 1 .. L-1
        keep = {li: len(pinned) + int(round(first + (last - first) * (li - 1) / steps)) for li in range(1, n_layers)}
    return Recompute(tuple(ids[p] for p in pos), tuple(pos), tuple(p in pinned for p in pos), keep)


class StepRecompute:
    """The recomputes of one step: their rotary positions, their narrowing layer by layer
    (the packed batch shrinks; segments after a narrowed one move down), their KV writes
    and their attention. Engine thread only; made by the runner's forward."""

    def __init__(self, segments: list["Segment"], device):
        self.segments = segments  # all of the step's, in packed order
        self.state = {}  # id(segment) -> [positions tensor, pinned tensor]
        for s in segments:
            rc = s.recompute
            if rc is not None and rc.ids:
                rc.check(s.cache.length)
                pinned = torch.tensor(rc.pinned or [False] * len(rc.ids), dtype=torch.bool, device=device)
                self.state[id(s)] = [torch.tensor(rc.positions, dtype=torch.long, device=device), pinned]
        self.layers = set(li for s in segments if id(s) in self.state for li in s.recompute.keep)

    def carried(self, seg: "Segment") -> int:
        st = self.state.get(id(seg))
        return 0 if st is None else st[0].shape[0]

    def positions(self, seg: "Segment") -> Optional[torch.Tensor]:
        st = self.state.get(id(seg))
        return None if st is None else st[0]

    def narrow(self, li: int, k: torch.Tensor, v: torch.Tensor) -> Optional[torch.Tensor]:
        """At a selecting layer: keep each recompute's ``keep[li]`` carried tokens (pinned
        first, then by the deviation of k, v [T, Hkv, D] from the stored layer-li KV),
        move the segments' starts and counts, and return the packed indices that stay
        (None when the batch is unchanged)."""
        if li not in self.layers:
            return None
        parts, offset, changed = [], 0, False
        for seg in self.segments:
            s, n = seg.start, seg.n
            st = self.state.get(id(seg))
            want = seg.recompute.keep.get(li) if st is not None else None
            m = st[0].shape[0] if st is not None else 0
            if want is None or want >= m:
                parts.append(torch.arange(s, s + n, device=k.device))
            else:
                pos, pinned = st
                stored_k, stored_v = seg.cache.kv[li, 0][:, pos], seg.cache.kv[li, 1][:, pos]  # [Hkv, m, D]
                dev = ((k[s:s + m].float() - stored_k.transpose(0, 1).float()) ** 2).sum((1, 2)) \
                    + ((v[s:s + m].float() - stored_v.transpose(0, 1).float()) ** 2).sum((1, 2))
                dev = dev.masked_fill(pinned, float("inf"))
                top = dev.topk(max(want, 0)).indices.sort().values
                st[0], st[1] = pos[top], pinned[top]
                parts += [top + s, torch.arange(s + m, s + n, device=k.device)]
                n = n - m + top.shape[0]
                changed = True
            seg.start, seg.n = offset, n
            offset += n
        return torch.cat(parts) if changed else None

    def write(self, seg: "Segment", li: int, k: torch.Tensor, v: torch.Tensor) -> int:
        """Write the carried tokens' fresh K/V ([m, Hkv, D], the segment's first m) at their
        positions; returns m."""
        pos = self.positions(seg)
        m = pos.shape[0]
        if m:
            seg.cache.kv[li, 0][:, pos] = k[:m].transpose(0, 1)
            seg.cache.kv[li, 1][:, pos] = v[:m].transpose(0, 1)
        return m

    def attend(self, seg: "Segment", li: int, q: torch.Tensor, gqa: bool) -> torch.Tensor:
        """The carried tokens' attention: q [m, H, D] at their positions over the cache up
        to each one's position (keys past the last carried token are never read); [m, H, D]."""
        pos = self.positions(seg)
        width = int(pos[-1]) + 1
        kk, vv = seg.cache.view(li, width)
        mask = torch.arange(width, device=q.device)[None, :] <= pos[:, None]
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], kk[None], vv[None], attn_mask=mask,
                                           enable_gqa=gqa)
        return o[0].transpose(0, 1)
