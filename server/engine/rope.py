"""Rotary position embeddings as the Llama family applies them (HF's convention)."""

from __future__ import annotations

import torch


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.chunk(2, dim=-1)  # split, not slicing: under autograd a slice's backward zero-fills a full-size gradient
    return torch.cat((-hi, lo), dim=-1)


def rotate_keys(runner, kv: torch.Tensor, delta: int) -> torch.Tensor:
    """Move a KV span by ``delta`` positions (``runner``: a LlamaRunner or a RopeOnly): kv [L, 2, Hkv, n, D] with keys rotated for
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


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] -> rotated x (HF's convention)."""
    return x * cos[:, None, :] + rotate_half(x) * sin[:, None, :]


class RopeOnly:
    """A model's rotary embedding without its weights, for moving stored keys where there
    is no knowmux runner (the vllm engine): ``rope`` and ``rotary`` as LlamaRunner has them,
    built from the model folder's config with the model family's own rotary class (its
    rope scaling included)."""

    def __init__(self, config, rotary: torch.nn.Module):
        self.config, self.rotary = config, rotary
        self.device = torch.device("cpu")
        self.n_layers = config.num_hidden_layers
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    @classmethod
    def from_folder(cls, path) -> "RopeOnly":
        import sys

        from transformers import AutoConfig
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = AutoConfig.from_pretrained(path)
        module = sys.modules[MODEL_FOR_CAUSAL_LM_MAPPING[type(config)].__module__]
        found = [getattr(module, n) for n in dir(module) if n.endswith("RotaryEmbedding")]
        if len(found) != 1:
            raise ValueError(f"{type(config).__name__}: no single rotary embedding class in {module.__name__}")
        return cls(config, found[0](config))

    def rope(self, positions: torch.Tensor, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        dummy = torch.empty(1, 1, self.head_dim, dtype=dtype or torch.float32)
        cos, sin = self.rotary(dummy, positions[None])
        return cos[0], sin[0]
