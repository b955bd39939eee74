"""Rotary position embeddings as the Llama family applies them (HF's convention)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.chunk(2, dim=-1)  # split, not slicing: under autograd a slice's backward zero-fills a full-size gradient
    return torch.cat((-hi, lo), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] -> rotated x (HF's convention)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]
