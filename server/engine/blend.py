"""Joining KV caches computed apart: keys moved to a new position (TurboRAG's reordered
positions) and CacheBlend's selective recompute of the tokens whose KV deviates most.
Both read the runner's weights and rope; neither runs inside a step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import torch
import torch.nn.functional as F

from .kvcache import RowCache
from .rope import rotate_half

if TYPE_CHECKING:
    from .model import LlamaRunner


def rotate_keys(runner: "LlamaRunner", kv: torch.Tensor, delta: int) -> torch.Tensor:
    """Move a KV span by ``delta`` positions: kv [L, 2, Hkv, n, D] with keys rotated for
    positions p..p+n-1 -> keys for p+delta.. (values unchanged). RoPE rotates each
    frequency pair by position * inv_freq, and rotations compose, so one more rotation
    by delta * inv_freq is exact (TurboRAG's reordered positions). Returns a new tensor."""
    kv = kv.to(runner.device)
    if delta == 0:
        return kv.clone()
    # in float32 whatever the cache's dtype: one more rounding of the keys, not two
    cos, sin = runner.rope(torch.tensor([delta]), dtype=torch.float32)
    scale = float(getattr(runner.rotary, "attention_scaling", 1.0) or 1.0)  # cos/sin carry it; undo once
    cos, sin = cos[0] / scale, sin[0] / scale
    out = kv.clone()
    k = kv[:, 0].float()
    out[:, 0] = (k * cos + rotate_half(k) * sin).to(kv.dtype)
    return out


@torch.inference_mode()
def cacheblend(runner: "LlamaRunner", cache: RowCache, input_ids: torch.Tensor, exact_upto: int,
               fraction: float, positions: Optional[list[int]] = None) -> torch.Tensor:
    """CacheBlend-style selective recompute (Yao et al., 2024) of a joined cache, in place.

    ``cache`` holds KV for positions 0..n-1 of ``input_ids`` [n], of which 0..exact_upto-1
    are exact and the rest were computed passage by passage (they lack attention to
    earlier passages). Layer-0 keys and values depend only on the token and its
    position, so they are exact already; layer 0's attention output is recomputed
    for every token, giving each token's true layer-1 input. The tokens from
    ``exact_upto`` on whose layer-1 K/V deviate most from the stored ones (squared
    L2 over heads) are selected, ``round(fraction * (n - exact_upto))`` of them, and
    only they are carried through the remaining layers, their fresh K/V overwriting
    the stored ones. Returns the selected positions (sorted). fraction = 1 reproduces
    a full prefill.

    With ``positions`` the tokens are given instead of selected (EPIC's LegoLink: the
    first tokens of each independently encoded passage, its attention sinks): they are
    carried through every layer from the embedding, each attending to the joined cache
    with the fresh keys and values of the given tokens before it (``fraction`` unused).
    All positions from ``exact_upto`` on reproduce a full prefill too.
    """
    n = input_ids.shape[0]
    if cache.length != n:
        raise ValueError(f"blend needs a cache filled with exactly the {n} tokens")
    H, Hkv, D = runner.n_heads, runner.n_kv_heads, runner.head_dim
    idx = torch.arange(n, device=runner.device)
    cos, sin = runner.rope(idx + cache.pos_offset)
    x = F.embedding(input_ids.to(runner.device), runner.embed)
    selected = idx[:0]
    if positions is not None:
        if not positions:
            return selected
        idx = selected = torch.tensor(sorted(set(positions)), dtype=torch.long, device=runner.device)
        x = x[idx]
    for li, L in enumerate(runner.layers):
        h = runner.rms_norm(x, L.ln1)
        qkv = L.qkv(h)
        q, k, v = runner.split_qkv(qkv, cos[idx], sin[idx])
        if li == 1 and positions is None:  # choose the tokens to carry on from their layer-1 deviation
            dev = ((k.transpose(0, 1) - cache.kv[1, 0, :, :n]) ** 2).sum((0, 2)) \
                + ((v.transpose(0, 1) - cache.kv[1, 1, :, :n]) ** 2).sum((0, 2))
            m = int(round(fraction * (n - exact_upto)))
            if m <= 0:
                return selected
            selected = (dev[exact_upto:].topk(m).indices + exact_upto).sort().values
            x, q, k, v, idx = x[selected], q[selected], k[selected], v[selected], selected
        cache.kv[li, 0, :, idx] = k.transpose(0, 1)
        cache.kv[li, 1, :, idx] = v.transpose(0, 1)
        mask = torch.arange(n, device=runner.device)[None, :] <= idx[:, None]  # each query sees keys up to its position
        o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], cache.kv[li, 0, :, :n][None],
                                           cache.kv[li, 1, :, :n][None], attn_mask=mask,
                                           enable_gqa=Hkv != H)[0].transpose(0, 1)
        x = x + L.o(o.reshape(-1, H * D))
        h = runner.rms_norm(x, L.ln2)
        gu = L.gu(h)
        x = x + L.down(F.silu(gu[:, :runner.intermediate]) * gu[:, runner.intermediate:])
    return selected

