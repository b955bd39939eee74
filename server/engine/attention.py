"""Batched decode attention: the step's single-token rows whose caches are slots of one
``KVPool`` attend in one padded call (the runner's forward uses it for every layer)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .kvcache import KVPool

if TYPE_CHECKING:
    from .model import Segment


class PooledDecode:
    """The step's single-token rows whose caches are slots of one pool, attended together.

    For pool slots lo..hi (every slot in the range, running or not) the keys and values
    of layer ``li`` are one strided view ``[hi-lo+1, Hkv, Lmax, D]``; each member's query
    goes in its slot's line of a padded ``[hi-lo+1, H, 1, D]`` query, and a mask lets it
    see exactly its own ``length + 1`` keys. Lines of slots that are not members
    see key 0 only (their output is discarded; an all-false mask line would give NaN).
    The keys and values of the new tokens are written with one indexed store per layer.

    Rows that reweight their passages APE's way (server.engine.ape: temperature T, scale
    S) join the same call: when any member does, the step attends through ``_ape`` (the
    same padded lines, the passages' logits of those lines divided by T and shifted by
    ln S + (T - 1) logsumexp, computed per line and head; other lines unchanged), instead
    of each such row attending alone with its keys copied per query head.
    """

    def __init__(self, members: list[Segment], pool: KVPool, heads: int, head_dim: int, dtype):
        self.members = set(id(s) for s in members)
        self.pool = pool
        slots = [s.cache.slot for s in members]
        self.lo, hi = min(slots), max(slots)
        lengths = [s.cache.length + 1 for s in members]
        self.width = max(lengths)
        for s in members:  # the span read past a row's own keys must be finite (masked, weight 0)
            pool.ensure_clean(s.cache.slot, s.cache.length, self.width)
        n = hi - self.lo + 1
        rel = [slot - self.lo for slot in slots]
        dev = pool.kv.device  # the index tensors and the mask go where the pool is, once per step
        self._members, self._rel, self._n = members, rel, n
        self._heads, self._head_dim, self._dtype = heads, head_dim, dtype
        self.reindex()
        self.slots = torch.tensor(slots, device=dev)
        self.pos = torch.tensor([s.cache.length for s in members], device=dev)
        self.rel = torch.tensor(rel, device=dev)
        seen = torch.ones(n, dtype=torch.long)  # key count per line
        seen[rel] = torch.tensor(lengths)
        hidden = (torch.arange(self.width)[None, :] >= seen[:, None])[:, None, None, :]
        # additive, made once per step: SDPA would convert a boolean mask at every layer
        self.mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf")).to(dev)
        self.ape = self._ape_lines(members, rel, n, dev)

    def reindex(self) -> None:
        """Read the members' places in the packed batch (again, after a recompute in the
        step narrowed the batch and moved the tokens behind it)."""
        n, rel, dev = self._n, self._rel, self.pool.kv.device
        starts = [s.start for s in self._members]
        # the usual decode step: members are the step's first tokens and fill slots lo.. in
        # the same order, so their lines need no gathering (about 0.7 ms of a 28 ms batch-8 step)
        self.in_order = len(self._members) == n and starts == list(range(n)) and rel == list(range(n))
        self.tok = torch.tensor(starts, device=dev)
        self.q = None if self.in_order else \
            torch.zeros(n, self._heads, 1, self._head_dim, dtype=self._dtype, device=dev)

    def _ape_lines(self, members: list[Segment], rel: list[int], n: int, dev):
        """What ``_ape`` needs per line, made once per step: the logits' scale (1/(T sqrt D)
        on its passages' keys, 1/sqrt D elsewhere), which keys are passages (as 0/1 and as an
        additive 0/-inf), ln S and T - 1, and the padding mask in float32; None when no
        member reweights."""
        rows = [(r, s.cache.parallel, s.cache.length + 1) for r, s in zip(rel, members)
                if s.cache.parallel is not None and s.cache.parallel.reweights]
        if not rows:
            return None
        inv_t = torch.ones(n, 1, 1, self.width)
        ctx = torch.zeros(n, 1, 1, self.width)
        log_s, t_minus_1 = torch.zeros(n, 1, 1, 1), torch.zeros(n, 1, 1, 1)
        for r, p, seen in rows:  # the passages, as far as the row's keys go
            inv_t[r, ..., p.start:min(p.end, seen)] = 1.0 / p.temperature
            ctx[r, ..., p.start:min(p.end, seen)] = 1.0
            log_s[r], t_minus_1[r] = math.log(p.scale), p.temperature - 1.0
        only_ctx = torch.zeros_like(ctx).masked_fill_(ctx == 0, float("-inf"))
        return tuple(x.to(dev) for x in (inv_t, ctx, only_ctx, log_s, t_minus_1, self.mask.float()))

    def __contains__(self, seg: Segment) -> bool:
        return id(seg) in self.members

    @classmethod
    def of(cls, segments: list[Segment], heads: int, head_dim: int, dtype) -> Optional["PooledDecode"]:
        members = [s for s in segments if s.n == 1 and s.cache.pool is not None]
        if members:
            pool = members[0].cache.pool
            members = [s for s in members if s.cache.pool is pool]
        return cls(members, pool, heads, head_dim, dtype) if members else None

    def attend(self, li: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
               gqa: bool) -> None:
        keys, values = self.pool.kv[li, 0], self.pool.kv[li, 1]  # [slots, Hkv, row_tokens, D]
        n = self.mask.shape[0]
        if self.in_order:
            keys[self.slots, :, self.pos] = k[:n]
            values[self.slots, :, self.pos] = v[:n]
            lines = q[:n, :, None]
        else:
            keys[self.slots, :, self.pos] = k[self.tok]
            values[self.slots, :, self.pos] = v[self.tok]
            self.q[self.rel, :, 0] = q[self.tok]
            lines = self.q
        span = slice(self.lo, self.lo + n)
        if self.ape is None:
            o = F.scaled_dot_product_attention(lines, keys[span, :, :self.width], values[span, :, :self.width],
                                               attn_mask=self.mask, enable_gqa=gqa)
        else:
            o = self._ape(lines, keys[span, :, :self.width], values[span, :, :self.width])
        if self.in_order:
            out[:n] = o[:, :, 0]
        else:
            out[self.tok] = o[self.rel, :, 0]

    def _ape(self, lines: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """lines [n, H, 1, D] over keys and values [n, Hkv, W, D], APE's reweighting on the
        lines that ask for it, in float32 (as server.engine.ape.attend); [n, H, 1, D]."""
        n, H, _, D = lines.shape
        Hkv = keys.shape[1]
        inv_t, ctx, only_ctx, log_s, t_minus_1, mask = self.ape
        q = lines.float().reshape(n, Hkv, H // Hkv, D)  # query head h reads KV head h // (H / Hkv)
        a = (q @ keys.float().transpose(-1, -2)).mul_(inv_t / math.sqrt(D))  # [n, Hkv, G, W]
        lse = torch.logsumexp(a + only_ctx, -1, keepdim=True).clamp_(min=-1e30)  # lines without passages: 0 below
        a.add_((log_s + t_minus_1 * lse) * ctx).add_(mask)
        o = torch.softmax(a, -1) @ values.float()  # [n, Hkv, G, D]
        return o.reshape(n, H, 1, D).to(lines.dtype)
