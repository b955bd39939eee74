"""LoRA training through the engine's own weights: one packed forward for many adapters
at once, each segment with its own trainable deltas (adapters.train drives it)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from .model import LlamaRunner


def lora_losses(runner: "LlamaRunner", input_ids: torch.Tensor, segments: list) -> torch.Tensor:
    """Training forward for many LoRA adapters at once, with autograd.

    ``input_ids`` [T] packs the segments' sequences; each segment is one sequence with
    its own trainable deltas on the feed-forward projections: it has ``start``, ``n``
    (its tokens in the packed batch), ``labels`` [n] (-100 = no loss), ``deltas``
    {(layer, projection): (A [r, in], B [out, r])} and ``scale`` (alpha / r). The
    linear layers run once over all T tokens; attention is causal within each segment; each segment's
    delta ``scale * (x A^T) B^T`` is added to its own tokens only. Returns each
    segment's mean next-token cross-entropy on its labelled tokens (HF's shift:
    position i predicts label i+1), [n_segments], 0 where a segment has no label.
    Their sum's gradient for each adapter is exactly the gradient of its own loss, as
    if it were trained alone. Logits are computed only where there is a label (most
    of a QA sequence is prompt); the base weights get no gradient.
    """
    H, Hkv, D, I = runner.n_heads, runner.n_kv_heads, runner.head_dim, runner.intermediate
    T = input_ids.shape[0]
    dev = runner.device
    positions = torch.cat([torch.arange(s.n) for s in segments])
    cos, sin = runner.rope(positions)
    x = F.embedding(input_ids.to(dev), runner.embed.detach())

    # The segments tile the batch in order. Per-segment pieces are taken with split, not
    # slicing: the backward of a slice zero-fills a gradient of the full tensor, once per
    # segment, layer and tensor (8% of an epoch's time in aten::fill_ before the change).
    sizes = [s.n for s in segments]
    # Every segment's low-rank product in two matmuls for the whole batch: the
    # segments' A stacked [S r, in] and B side by side [out, S r]; a token keeps only
    # its own segment's r columns of x A^T, scaled (a block mask [T, S r]).
    owner = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(sizes))
    ranks = [next(iter(s.deltas.values()))[0].shape[0] if s.deltas else 0 for s in segments]
    column_owner = torch.repeat_interleave(torch.arange(len(segments)), torch.tensor(ranks))
    column_scale = torch.repeat_interleave(torch.tensor([s.scale for s in segments]), torch.tensor(ranks))
    block = ((owner[:, None] == column_owner[None, :]).float() * column_scale).to(dev, x.dtype)

    def delta(y: torch.Tensor, inp: torch.Tensor, li: int, name: str) -> torch.Tensor:
        """y plus each segment's delta (a layer without adapters: y itself)."""
        abs_ = [seg.deltas.get((li, name)) for seg in segments]
        if any(ab is None for ab in abs_):
            return y  # the recipe leaves this layer out (for every segment: one recipe per batch)
        # the trainable weights stay float32 (peft's default); the product runs in the compute dtype
        a = torch.cat([ab[0] for ab in abs_]).to(inp.dtype)  # [S r, in]
        b = torch.cat([ab[1] for ab in abs_], dim=1).to(inp.dtype)  # [out, S r]
        return y + ((inp @ a.T) * block) @ b.T

    for li, L in enumerate(runner.layers):
        h = runner.rms_norm(x, L.ln1.detach())
        qkv = L.qkv.train_call(h)
        q, k, v = runner.split_qkv(qkv, cos, sin)
        outs = []
        for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
            o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                               vs.transpose(0, 1)[None], is_causal=True,
                                               enable_gqa=Hkv != H)
            outs.append(o[0].transpose(0, 1))
        flat = torch.cat(outs).reshape(T, H * D)
        x = x + L.o.train_call(flat)
        h = runner.rms_norm(x, L.ln2.detach())
        gate, up = L.gu.train_call(h).split([I, I], dim=1)
        act = F.silu(delta(gate, h, li, "gate_proj")) * delta(up, h, li, "up_proj")
        down = L.down.train_call(act)
        x = x + delta(down, act, li, "down_proj")
    losses = []
    for seg in segments:
        labels = seg.labels[1:].to(dev)
        at = torch.nonzero(labels != -100).flatten()
        if at.numel() == 0:
            losses.append(x.new_zeros((), dtype=torch.float32))
            continue
        hidden = runner.rms_norm(x[seg.start + at], runner.norm.detach())
        losses.append(F.cross_entropy(runner.lm_head.train_call(hidden).float(), labels[at]))
    return torch.stack(losses)

