"""A packed-batch forward pass for Llama-family causal LMs (Llama, Mistral, Qwen2, SmolLM2).

The weights come from a transformers model; the forward is ours, so that one step can
mix rows of different lengths and phases (a prefill chunk of one row beside single
decode tokens of others), each row with its own KV cache, injected prefix and
low-rank deltas. All tokens of a step are packed into one [T, hidden] tensor: the
linear layers run once for everyone. Attention of the single-token (decode) rows whose
caches live in one ``KVPool`` runs as one padded call over the pool's slot range;
prefill chunks and rows with private caches attend one row at a time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from . import ape
from .attention import PooledDecode
from .kernels import TUNED, Proj, return_free_memory, tune_kernels, use_linear
from .kvcache import KVPool, RowCache
from .lora import AdapterSet, apply_deltas
from .recompute import Recompute, StepRecompute
from .rope import apply_rope
from .training import lora_losses

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    pass


@dataclass
class Segment:
    """One row's share of a step: tokens ``start..start+n-1`` of the packed batch,
    written to ``cache`` at positions ``cache.length..cache.length+n-1`` (with a
    ``recompute``, its tokens come first and are written at their own positions; a step
    that narrows them moves ``start`` and ``n``)."""

    cache: RowCache
    start: int
    n: int
    adapters: Optional[AdapterSet] = None
    want_logits: bool = False  # compute logits for the last token of this segment
    # tokens of the cache's injected prefix carried through the layers again, packed in
    # front of the segment's own tokens (counted in ``n``; server.engine.recompute)
    recompute: Optional[Recompute] = None


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: Proj  # q, k, v stacked: out = (H + 2 Hkv) * D
    o: Proj
    ln2: torch.Tensor
    gu: Proj  # gate and up stacked: out = 2 * intermediate
    down: Proj


def _cat_bias(*linears) -> Optional[torch.Tensor]:
    if all(l.bias is None for l in linears):
        return None
    w = linears[0].weight
    return torch.cat([l.bias if l.bias is not None else w.new_zeros(l.out_features) for l in linears])

class LlamaRunner:
    """Runs packed steps. Shapes: H query heads, Hkv key/value heads, D head dim."""

    def __init__(self, hf_model: torch.nn.Module):
        cfg = hf_model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModel(
                f"model type {cfg.model_type!r} ({', '.join(cfg.architectures or [])}) is not supported "
                f"by the torch engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        if getattr(cfg, "hidden_act", "silu") != "silu":
            raise UnsupportedModel(f"activation {cfg.hidden_act!r} is not supported (silu only)")
        self.config = cfg
        first = next(hf_model.parameters())
        # every tensor the engine makes lives where the weights do, in their dtype
        self.dtype, self.device = first.dtype, first.device
        m = hf_model.model
        self.n_layers = cfg.num_hidden_layers
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.n_heads
        self.hidden = cfg.hidden_size
        self.intermediate = cfg.intermediate_size
        self.eps = cfg.rms_norm_eps
        self.vocab_size = cfg.vocab_size
        self.max_positions = cfg.max_position_embeddings
        window = getattr(cfg, "sliding_window", None)  # Mistral; Qwen2 with use_sliding_window
        if window and window < self.max_positions and "sliding_attention" in (getattr(cfg, "layer_types", None)
                                                                               or ["sliding_attention"]):
            # this forward attends to every earlier token: up to the window that is the same
            log.warning("the model attends within a sliding window of %d tokens: contexts are capped there", window)
            self.max_positions = window
        self.embed = m.embed_tokens.weight
        self.norm = m.norm.weight
        tied = hf_model.lm_head.weight.data_ptr() == self.embed.data_ptr()
        self.lm_head = Proj(hf_model.lm_head.weight, keep_rows=tied, few_rows=True)  # tied: the embedding, held anyway
        self.rotary = m.rotary_emb
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in m.layers:
                a, f = layer.self_attn, layer.mlp
                qkv = Proj(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                            _cat_bias(a.q_proj, a.k_proj, a.v_proj))
                gu = Proj(torch.cat([f.gate_proj.weight, f.up_proj.weight]), _cat_bias(f.gate_proj, f.up_proj))
                wo, wdown = Proj(a.o_proj.weight, a.o_proj.bias), Proj(f.down_proj.weight, f.down_proj.bias)
                # Point the module weights at views of our copies so the process holds
                # no third copy (and the HF modules stay usable, e.g. for peft).
                q, k = a.q_proj.out_features, a.k_proj.out_features
                a.q_proj.weight.data = qkv.weight[:q]
                a.k_proj.weight.data = qkv.weight[q:q + k]
                a.v_proj.weight.data = qkv.weight[q + k:]
                f.gate_proj.weight.data = gu.weight[:self.intermediate]
                f.up_proj.weight.data = gu.weight[self.intermediate:]
                a.o_proj.weight.data, f.down_proj.weight.data = wo.weight, wdown.weight
                self.layers.append(_Layer(layer.input_layernorm.weight, qkv, wo,
                                          layer.post_attention_layernorm.weight, gu, wdown))
        # {(out, in): kernel per row bucket}, as timed at start (benchmarks record it); the
        # timed CPU kernels serve float32 on the CPU, F.linear everything else
        projs = [self.lm_head] + [p for L in self.layers for p in (L.qkv, L.o, L.gu, L.down)]
        if self.device.type == "cpu" and self.dtype == torch.float32:
            self.kernels = tune_kernels(projs, memo=TUNED)
        else:
            self.kernels = use_linear(projs)
        return_free_memory()  # the copies the timing built and dropped

    def new_cache(self, capacity: int, pos_offset: int = 0) -> RowCache:
        return RowCache(self.n_layers, self.n_kv_heads, self.head_dim, capacity, self.dtype, pos_offset,
                        device=self.device)

    def new_pool(self, slots: int, row_tokens: int) -> KVPool:
        return KVPool(self.n_layers, self.n_kv_heads, self.head_dim, slots, row_tokens, self.dtype,
                      device=self.device)

    def ids(self, ids) -> torch.Tensor:
        """Token ids (a list) as the [T] long tensor ``forward`` takes, on the model's device."""
        return torch.as_tensor(ids, dtype=torch.long, device=self.device)

    def rope(self, positions: torch.Tensor, dtype: Optional[torch.dtype] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] for integer positions [T] (model's own rope scaling),
        in ``dtype`` (default: the model's), on the model's device."""
        positions = positions.to(self.device)
        dummy = torch.empty(1, 1, self.head_dim, dtype=dtype or self.dtype, device=self.device)
        cos, sin = self.rotary(dummy, positions[None])
        return cos[0], sin[0]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """RMSNorm as the model's own module computes it: in float32 for lower precisions
        (normalised in float32, cast back, then scaled), fused for float32."""
        if x.dtype == torch.float32:
            return F.rms_norm(x, (self.hidden,), weight, self.eps)
        return weight * F.rms_norm(x.float(), (self.hidden,), None, self.eps).to(x.dtype)

    def split_qkv(self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """A fused q/k/v projection [T, (H + 2 Hkv) D] -> q [T, H, D] and k [T, Hkv, D] with
        rope applied, v [T, Hkv, D]: the one place the three layer loops (serving,
        CacheBlend recompute, LoRA training) read the fused layout."""
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        T = qkv.shape[0]
        # q and k lie side by side in the fused layout: one rotation for both (half the
        # elementwise calls; a batch-8 decode step 28.6-30.6 -> 27.9-28.2 ms, A/B in one process).
        # split rather than slicing: LoRA training backpropagates through here (see _rotate_half)
        qk, v = qkv.split([(H + Hkv) * D, Hkv * D], dim=1)
        q, k = apply_rope(qk.view(T, H + Hkv, D), cos, sin).split([H, Hkv], dim=1)
        return q, k, v.view(T, Hkv, D)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """One step. input_ids: [T] long, the segments' tokens packed in order.

        Writes each segment's keys/values into its cache and advances ``cache.length``
        by ``n``. Returns float32 logits [n_want, vocab], one line per segment with
        ``want_logits``, in segment order.
        """
        T = input_ids.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        blend = StepRecompute(segments, self.device) if any(s.recompute is not None for s in segments) else None
        positions = torch.cat([self._positions(s, blend) for s in segments])
        cos, sin = self.rope(positions)
        any_lora = any(s.adapters is not None for s in segments)
        pooled = PooledDecode.of(segments, H, D, self.dtype)
        rest = [s for s in segments if pooled is None or s not in pooled]
        x = F.embedding(input_ids.to(self.device), self.embed)
        attn = torch.empty(T, H, D, dtype=x.dtype, device=self.device)
        for li, L in enumerate(self.layers):
            h = self.rms_norm(x, L.ln1)
            qkv = L.qkv(h)
            if any_lora:
                for off, name, width in ((0, "q_proj", H * D), (H * D, "k_proj", Hkv * D),
                                         (H * D + Hkv * D, "v_proj", Hkv * D)):
                    apply_deltas(qkv[:, off:off + width], h, segments, li, name)
            q, k, v = self.split_qkv(qkv, cos, sin)
            if blend is not None:  # a recompute may drop tokens here: the batch shrinks from this layer on
                keep = blend.narrow(li, k, v)
                if keep is not None:
                    x, q, k, v, cos, sin = x[keep], q[keep], k[keep], v[keep], cos[keep], sin[keep]
                    T = x.shape[0]
                    attn = torch.empty(T, H, D, dtype=x.dtype, device=self.device)
                    if pooled is not None:
                        pooled.reindex()
            if pooled is not None:
                pooled.attend(li, q, k, v, attn, Hkv != H)
            for seg in rest:
                s, e, past = seg.start, seg.start + seg.n, seg.cache.length
                if blend is not None and blend.carried(seg):  # its recomputed prefix tokens first
                    m = blend.write(seg, li, k[s:e], v[s:e])
                    attn[s:s + m] = blend.attend(seg, li, q[s:s + m], Hkv != H)
                    s += m
                n = e - s
                seg.cache.write(li, past, k[s:e], v[s:e])
                kk, vv = seg.cache.view(li, past + n)
                qq = q[s:e].transpose(0, 1)  # [H, n, D]
                if seg.cache.parallel is not None and seg.cache.parallel.reweights:  # APE's T and S
                    attn[s:e] = ape.attend(qq, kk, vv, seg.cache.parallel, past).transpose(0, 1)
                    continue
                if n == 1:
                    mask, causal = None, False
                elif past == 0:
                    mask, causal = None, True
                else:  # query i sits at position past+i and sees keys 0..past+i
                    mask = torch.ones(n, past + n, dtype=torch.bool, device=self.device).tril(diagonal=past)
                    causal = False
                o = F.scaled_dot_product_attention(qq[None], kk[None], vv[None], attn_mask=mask,
                                                   is_causal=causal, enable_gqa=Hkv != H)
                attn[s:e] = o[0].transpose(0, 1)
            flat = attn.view(T, H * D)
            o = L.o(flat)
            if any_lora:
                apply_deltas(o, flat, segments, li, "o_proj")
            x = x + o
            h = self.rms_norm(x, L.ln2)
            gu = L.gu(h)
            if any_lora:
                apply_deltas(gu[:, :self.intermediate], h, segments, li, "gate_proj")
                apply_deltas(gu[:, self.intermediate:], h, segments, li, "up_proj")
            act = F.silu(gu[:, :self.intermediate]) * gu[:, self.intermediate:]
            down = L.down(act)
            if any_lora:
                apply_deltas(down, act, segments, li, "down_proj")
            x = x + down
        for seg in segments:
            seg.cache.length += seg.n - (blend.carried(seg) if blend is not None else 0)
        last = [s.start + s.n - 1 for s in segments if s.want_logits]
        if not last:
            return torch.empty(0, self.vocab_size, device=self.device)
        xl = self.rms_norm(x[last], self.norm)
        return self.lm_head(xl).float()

    @staticmethod
    def _positions(seg: Segment, blend: Optional[StepRecompute]) -> torch.Tensor:
        """The rotary positions of a segment's tokens: its recomputed prefix tokens' own,
        then cache.length.. for the rest."""
        own = torch.arange(seg.cache.length, seg.cache.length + seg.n) + seg.cache.pos_offset
        carried = blend.positions(seg) if blend is not None else None
        if carried is None:
            return own
        return torch.cat([carried.cpu() + seg.cache.pos_offset, own[:seg.n - carried.shape[0]]])

    def lora_losses(self, input_ids: torch.Tensor, segments: list) -> torch.Tensor:
        """Each segment's LoRA training loss, with autograd (server.engine.training)."""
        return lora_losses(self, input_ids, segments)
