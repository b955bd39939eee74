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

from .kvcache import KVPool, RowCache
from .lora import AdapterSet, apply_deltas

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class UnsupportedModel(ValueError):
    pass


@dataclass
class Segment:
    """One row's share of a step: tokens ``start..start+n-1`` of the packed batch,
    written to ``cache`` at positions ``cache.length..cache.length+n-1``."""

    cache: RowCache
    start: int
    n: int
    adapters: Optional[AdapterSet] = None
    want_logits: bool = False  # compute logits for the last token of this segment


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: "_Proj"  # q, k, v stacked: out = (H + 2 Hkv) * D
    o: "_Proj"
    ln2: torch.Tensor
    gu: "_Proj"  # gate and up stacked: out = 2 * intermediate
    down: "_Proj"


def _cat_bias(*linears) -> Optional[torch.Tensor]:
    if all(l.bias is None for l in linears):
        return None
    return torch.cat([l.bias if l.bias is not None else torch.zeros(l.out_features) for l in linears])


def _find_onednn_linear():
    """oneDNN's linear on dense fp32 tensors (the op torch's compiler uses on CPU), or
    None where this torch build has no oneDNN. It reads a plain weight where it lies, or
    a copy reordered into oneDNN's blocked layout (``_ONEDNN_REORDER``)."""
    if not torch.backends.mkldnn.is_available():
        return None, None
    try:
        linear = torch.ops.mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):
        return None, None
    try:
        reorder = torch.ops.mkldnn._reorder_linear_weight
    except (AttributeError, RuntimeError):
        reorder = None
    return linear, reorder


_ONEDNN_LINEAR, _ONEDNN_REORDER = _find_onednn_linear()

# The GEMM kernels a projection can run on, cheapest in memory first: "onednn" reads the
# plain weight in place; "mkl" adds MKL's packed copy for a few rows; "onednn_packed"
# adds a copy in oneDNN's blocked layout.
KERNELS = ("onednn", "mkl", "onednn_packed")


class _Proj:
    """A projection's weight kept for fast CPU matmuls, with a GEMM kernel per row count.

    ``t`` is the weight transposed, [in, out] contiguous; ``w`` the [out, in] weight
    oneDNN reads: the caller's own tensor when it stays alive anyway (``keep_rows``, e.g.
    an lm_head tied to the embedding; then ``t`` is only a view of it where no MKL path
    serves), otherwise a view of ``t``. Which kernel is fastest depends on the CPU and
    the row count, so ``tune_kernels`` times them at start on cold weights and sets
    ``kernels``, one of ``KERNELS`` per row bucket of ``BUCKETS``:

    - "mkl": one token through x @ t (GEMV), a few tokens through MKL's packed GEMM
      (``pack_mkl``, 2..PACKED_MAX_ROWS rows), prefill-sized products plain. On an Intel
      dev machine this beat F.linear 1.6x for one token and packed beat plain 2x at 8.
    - "onednn": oneDNN's linear reading ``w`` in place.
    - "onednn_packed": oneDNN's linear on a copy in its blocked layout
      (``pack_onednn``). On the 2-core AMD EPYC dev machine, SmolLM2's four projections
      of a layer read cold: 363 us at 1 row, 505 at 8; plain oneDNN 473 and 596; MKL 688
      and 1,271.
    Without tuning (``kernels`` empty) the MKL paths serve.
    """

    PACKED_MAX_ROWS = 64
    ONEDNN_PACK_ROWS = 8  # the row count oneDNN's blocked layout is chosen for; served well from 1 to 512

    _mkl = torch._C.has_mkl and hasattr(torch.ops.mkl, "_mkl_reorder_linear_weight")

    def __init__(self, w: torch.Tensor, bias: Optional[torch.Tensor] = None, keep_rows: bool = False,
                 few_rows: bool = False):
        # serves at most a batch's rows (the lm_head: one per sequence): tuned up to PACKED_MAX_ROWS only
        self.few_rows = few_rows
        self.t = w.detach().t().contiguous()
        self.own_rows = keep_rows and w.is_contiguous()  # w is the caller's tensor, not a view of t
        self.w = w.detach() if self.own_rows else self.t.t()
        self.bias = bias.detach() if bias is not None else None
        self.packed: Optional[torch.Tensor] = None  # MKL's packed copy: ``pack_mkl()``
        self.dnn_packed: Optional[torch.Tensor] = None  # oneDNN's blocked copy: ``pack_onednn()``
        self.kernels: tuple = ()  # per bucket of BUCKETS, one of KERNELS

    def pack_mkl(self) -> None:
        """Build MKL's packed copy of the weights (for 2..PACKED_MAX_ROWS rows), where MKL exists."""
        if self._mkl and self.packed is None:
            self.packed = torch.ops.mkl._mkl_reorder_linear_weight(self.t.t(), 16)

    def pack_onednn(self) -> None:
        """Build oneDNN's blocked copy of the weights (needs ``_ONEDNN_REORDER``)."""
        if self.dnn_packed is None:
            self.dnn_packed = _ONEDNN_REORDER(self.w, self.ONEDNN_PACK_ROWS)

    def use(self, kernels: tuple) -> None:
        """Serve with ``kernels`` (one per bucket), building the packed copies they need
        and dropping those they do not."""
        self.kernels = tuple(kernels)
        mkl_packs = any(k == "mkl" and 1 < b <= self.PACKED_MAX_ROWS for k, b in zip(kernels, self.BUCKETS))
        if mkl_packs:
            self.pack_mkl()
        else:
            self.packed = None
        if "onednn_packed" in self.kernels:
            self.pack_onednn()
        else:
            self.dnn_packed = None
        if self.own_rows:
            # Only MKL's paths need the transposed copy; oneDNN reads w, and its transposed
            # view w.t() for training's backward, in place (SmolLM2's lm_head: 113 MB less).
            if "mkl" in self.kernels and not self.t.is_contiguous():
                self.t = self.w.t().contiguous()
            elif "mkl" not in self.kernels:
                self.t = self.w.t()

    @property
    def weight(self) -> torch.Tensor:
        """[out, in] view, for modules that keep using the weight."""
        return self.t.t()

    # Row buckets for the kernel choice; rows 2..PACKED_MAX_ROWS are buckets 8 and 64
    BUCKETS = (1, 8, 64, 512)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out]."""
        return self.call_with(self.kernels[_bucket(x.shape[0])] if self.kernels else "mkl", x)

    def call_with(self, kernel: str, x: torch.Tensor) -> torch.Tensor:
        """x [T, in] -> [T, out] on ``kernel`` (its packed copy, if it reads one, must exist)."""
        if kernel == "onednn_packed":
            return _ONEDNN_LINEAR(x.contiguous(), self.dnn_packed, self.bias, "none", [], "")
        if kernel == "onednn":
            return _ONEDNN_LINEAR(x.contiguous(), self.w, self.bias, "none", [], "")
        return self.mkl_call(x)

    def mkl_call(self, x: torch.Tensor) -> torch.Tensor:
        """The MKL paths: packed for a few rows, plain otherwise."""
        if self.packed is not None and 1 < x.shape[0] <= self.PACKED_MAX_ROWS:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.t.t(), self.bias, x.shape[0])
        return self.plain(x)

    def plain(self, x: torch.Tensor) -> torch.Tensor:
        """The product without MKL's packed path (which has no autograd)."""
        return torch.addmm(self.bias, x, self.t) if self.bias is not None else x @ self.t

    def train_call(self, x: torch.Tensor) -> torch.Tensor:
        """The product with autograd to ``x`` (the weight is frozen): for LoRA training,
        through oneDNN where it serves prefill-sized products, else ``plain``."""
        if self.kernels and self.kernels[-1] != "mkl":
            return _FrozenOneDNNLinear.apply(x, self)
        return self.plain(x)


class _FrozenOneDNNLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN (plain or blocked weight, as the projection serves
    prefill), with the gradient to x only: dx = dy W, which is oneDNN's linear of dy
    against t = W^T (so both directions read stored weights in place)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, proj: _Proj) -> torch.Tensor:
        ctx.proj = proj
        return proj.call_with(proj.kernels[-1], x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return _ONEDNN_LINEAR(dy.contiguous(), ctx.proj.t, None, "none", [], ""), None


ROW_BUCKETS = _Proj.BUCKETS  # the row counts a kernel choice is made for (each serves up to that many rows)


def _bucket(n: int) -> int:
    """Index of the smallest of ``_Proj.BUCKETS`` that holds n rows (the last for more)."""
    for i, b in enumerate(_Proj.BUCKETS):
        if n <= b:
            return i
    return len(_Proj.BUCKETS) - 1


def tune_kernels(projs: list[_Proj], repeats: int = 3) -> dict:
    """Time the ``KERNELS`` against each other for each distinct weight shape at each
    row bucket, on the real weights, and give every projection of that shape the fastest
    (plain oneDNN unless another is more than 10% faster: the others cost a copy of the
    weights). Serving reads every weight cold (a step streams the whole model through
    the caches), so a kernel is timed over all the shape's weights back to back, as a
    step calls them; timing one warm weight misled (for SmolLM2's 576x576 o_proj at one
    row it chose MKL, slower cold: 0.046 vs 0.036 ms), and so did one weight after a
    cache flush (every call 1.5-2x slower than in a step). Packed copies are built for
    one shape at a time and kept only where a chosen kernel reads them. Off with
    KNOWMUX_ONEDNN=0 or where torch has no oneDNN (MKL everywhere, packed). Logs and
    returns {(out, in): [bucket -> kernel]}."""
    import os
    import time

    if os.environ.get("KNOWMUX_ONEDNN", "1") == "0" or _ONEDNN_LINEAR is None:
        for p in projs:
            p.use(("mkl",) * len(_Proj.BUCKETS))
        return {}
    kernels = [k for k in KERNELS if k != "onednn_packed" or _ONEDNN_REORDER is not None]
    by_shape: dict = {}
    for p in projs:
        by_shape.setdefault((tuple(p.t.shape[::-1]), p.w.is_contiguous()), []).append(p)
    out = {}
    with torch.inference_mode():
        for (shape, _), group in by_shape.items():
            candidates = list(kernels)
            for p in group:  # each kernel timed as it would serve
                p.pack_mkl()
            if "onednn_packed" in candidates:
                try:
                    for p in group:
                        p.pack_onednn()
                except RuntimeError as e:  # a shape or CPU oneDNN cannot reorder for: serve without it
                    log.warning("no blocked oneDNN layout for %s weights: %s", shape, e)
                    candidates.remove("onednn_packed")
                    for p in group:
                        p.dnn_packed = None
            choice = []
            for rows in _Proj.BUCKETS:
                if rows > _Proj.PACKED_MAX_ROWS and all(p.few_rows for p in group):
                    choice.append(choice[-1])  # never served: not worth timing (0.3 s per kernel for an lm_head)
                    continue
                x = torch.randn(rows, shape[1])
                # prefill-sized products are compute-bound: two weights tell as much as all
                members = group if rows <= _Proj.PACKED_MAX_ROWS else group[:2]
                times: dict = {}
                for k in candidates:
                    members[0].call_with(k, x)  # oneDNN makes its primitive for a new shape at the first call
                    times[k] = float("inf")
                for _ in range(repeats):
                    for k in candidates:  # interleaved, so that a burst of noise hits every kernel
                        t0 = time.perf_counter()
                        for p in members:
                            p.call_with(k, x)
                        times[k] = min(times[k], time.perf_counter() - t0)  # noise only adds time
                best = min(times, key=times.get)
                choice.append(best if times[best] < 0.9 * times["onednn"] else "onednn")
            out[shape] = choice
            for p in group:
                p.use(choice)
    log.info("GEMM kernel per weight shape and row bucket %s: %s", _Proj.BUCKETS, out or "MKL only")
    return out


def _return_free_memory() -> None:
    """Hand memory that is free in the C heap back to the OS (glibc's ``malloc_trim``).
    Building a runner allocates and frees a few hundred MB of weight copies (the fused
    weights' sources, the packed copies timed and dropped), which glibc otherwise keeps
    as resident holes in its heap: 2139 -> 1718 MB resident for SmolLM2. A no-op where
    the C library has no ``malloc_trim``."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    lo, hi = x.chunk(2, dim=-1)  # split, not slicing: under autograd a slice's backward zero-fills a full-size gradient
    return torch.cat((-hi, lo), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, heads, head_dim]; cos, sin: [T, head_dim] -> rotated x (HF's convention)."""
    return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]


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
        self.dtype = next(hf_model.parameters()).dtype
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
        self.lm_head = _Proj(hf_model.lm_head.weight, keep_rows=tied, few_rows=True)  # tied: the embedding, held anyway
        self.rotary = m.rotary_emb
        self.layers: list[_Layer] = []
        with torch.no_grad():
            for layer in m.layers:
                a, f = layer.self_attn, layer.mlp
                qkv = _Proj(torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                            _cat_bias(a.q_proj, a.k_proj, a.v_proj))
                gu = _Proj(torch.cat([f.gate_proj.weight, f.up_proj.weight]), _cat_bias(f.gate_proj, f.up_proj))
                wo, wdown = _Proj(a.o_proj.weight, a.o_proj.bias), _Proj(f.down_proj.weight, f.down_proj.bias)
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
        # {(out, in): kernel per row bucket}, as timed at start (benchmarks record it)
        self.kernels = tune_kernels([self.lm_head] + [p for L in self.layers for p in (L.qkv, L.o, L.gu, L.down)])
        _return_free_memory()  # the copies the timing built and dropped

    def new_cache(self, capacity: int, pos_offset: int = 0) -> RowCache:
        return RowCache(self.n_layers, self.n_kv_heads, self.head_dim, capacity, self.dtype, pos_offset)

    def new_pool(self, slots: int, row_tokens: int) -> KVPool:
        return KVPool(self.n_layers, self.n_kv_heads, self.head_dim, slots, row_tokens, self.dtype)

    def rope(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [T, head_dim] for integer positions [T] (model's own rope scaling)."""
        dummy = torch.empty(1, 1, self.head_dim, dtype=self.dtype)
        cos, sin = self.rotary(dummy, positions[None])
        return cos[0], sin[0]

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

    def rotate_keys(self, kv: torch.Tensor, delta: int) -> torch.Tensor:
        """Move a KV span by ``delta`` positions: kv [L, 2, Hkv, n, D] with keys rotated for
        positions p..p+n-1 -> keys for p+delta.. (values unchanged). RoPE rotates each
        frequency pair by position * inv_freq, and rotations compose, so one more rotation
        by delta * inv_freq is exact (TurboRAG's reordered positions). Returns a new tensor."""
        if delta == 0:
            return kv.clone()
        cos, sin = self.rope(torch.tensor([delta]))
        scale = float(getattr(self.rotary, "attention_scaling", 1.0) or 1.0)  # cos/sin carry it; undo once
        cos, sin = cos[0] / scale, sin[0] / scale
        out = kv.clone()
        k = kv[:, 0]
        out[:, 0] = k * cos + _rotate_half(k) * sin
        return out

    @torch.inference_mode()
    def blend(self, cache: RowCache, input_ids: torch.Tensor, exact_upto: int, fraction: float) -> torch.Tensor:
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
        """
        n = input_ids.shape[0]
        if cache.length != n:
            raise ValueError(f"blend needs a cache filled with exactly the {n} tokens")
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        idx = torch.arange(n)
        cos, sin = self.rope(idx + cache.pos_offset)
        x = F.embedding(input_ids, self.embed)
        selected = idx[:0]
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1, self.eps)
            qkv = L.qkv(h)
            q, k, v = self.split_qkv(qkv, cos[idx], sin[idx])
            if li == 1:  # choose the tokens to carry on from their layer-1 deviation
                dev = ((k.transpose(0, 1) - cache.kv[1, 0, :, :n]) ** 2).sum((0, 2)) \
                    + ((v.transpose(0, 1) - cache.kv[1, 1, :, :n]) ** 2).sum((0, 2))
                m = int(round(fraction * (n - exact_upto)))
                if m <= 0:
                    return selected
                selected = (dev[exact_upto:].topk(m).indices + exact_upto).sort().values
                x, q, k, v, idx = x[selected], q[selected], k[selected], v[selected], selected
            cache.kv[li, 0, :, idx] = k.transpose(0, 1)
            cache.kv[li, 1, :, idx] = v.transpose(0, 1)
            mask = torch.arange(n)[None, :] <= idx[:, None]  # each query sees keys up to its position
            o = F.scaled_dot_product_attention(q.transpose(0, 1)[None], cache.kv[li, 0, :, :n][None],
                                               cache.kv[li, 1, :, :n][None], attn_mask=mask,
                                               enable_gqa=Hkv != H)[0].transpose(0, 1)
            x = x + L.o(o.reshape(-1, H * D))
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
            gu = L.gu(h)
            x = x + L.down(F.silu(gu[:, :self.intermediate]) * gu[:, self.intermediate:])
        return selected

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, segments: list[Segment]) -> torch.Tensor:
        """One step. input_ids: [T] long, the segments' tokens packed in order.

        Writes each segment's keys/values into its cache and advances ``cache.length``
        by ``n``. Returns float32 logits [n_want, vocab], one line per segment with
        ``want_logits``, in segment order.
        """
        T = input_ids.shape[0]
        H, Hkv, D = self.n_heads, self.n_kv_heads, self.head_dim
        positions = torch.cat([torch.arange(s.cache.length, s.cache.length + s.n) + s.cache.pos_offset
                               for s in segments])
        cos, sin = self.rope(positions)
        any_lora = any(s.adapters is not None for s in segments)
        pooled = _PooledDecode.of(segments, H, D, self.dtype)
        rest = [s for s in segments if pooled is None or s not in pooled]
        x = F.embedding(input_ids, self.embed)
        attn = torch.empty(T, H, D, dtype=x.dtype)
        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1, self.eps)
            qkv = L.qkv(h)
            if any_lora:
                for off, name, width in ((0, "q_proj", H * D), (H * D, "k_proj", Hkv * D),
                                         (H * D + Hkv * D, "v_proj", Hkv * D)):
                    apply_deltas(qkv[:, off:off + width], h, segments, li, name)
            q, k, v = self.split_qkv(qkv, cos, sin)
            if pooled is not None:
                pooled.attend(li, q, k, v, attn, Hkv != H)
            for seg in rest:
                s, e, past = seg.start, seg.start + seg.n, seg.cache.length
                seg.cache.write(li, past, k[s:e], v[s:e])
                kk, vv = seg.cache.view(li, past + seg.n)
                qq = q[s:e].transpose(0, 1)  # [H, n, D]
                if seg.n == 1:
                    mask, causal = None, False
                elif past == 0:
                    mask, causal = None, True
                else:  # query i sits at position past+i and sees keys 0..past+i
                    mask = torch.ones(seg.n, past + seg.n, dtype=torch.bool).tril(diagonal=past)
                    causal = False
                o = F.scaled_dot_product_attention(qq[None], kk[None], vv[None], attn_mask=mask,
                                                   is_causal=causal, enable_gqa=Hkv != H)
                attn[s:e] = o[0].transpose(0, 1)
            flat = attn.view(T, H * D)
            o = L.o(flat)
            if any_lora:
                apply_deltas(o, flat, segments, li, "o_proj")
            x = x + o
            h = F.rms_norm(x, (self.hidden,), L.ln2, self.eps)
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
            seg.cache.length += seg.n
        last = [s.start + s.n - 1 for s in segments if s.want_logits]
        if not last:
            return torch.empty(0, self.vocab_size)
        xl = F.rms_norm(x[last], (self.hidden,), self.norm, self.eps)
        return self.lm_head(xl).float()

    def lora_losses(self, input_ids: torch.Tensor, segments: list) -> torch.Tensor:
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
        H, Hkv, D, I = self.n_heads, self.n_kv_heads, self.head_dim, self.intermediate
        T = input_ids.shape[0]
        positions = torch.cat([torch.arange(s.n) for s in segments])
        cos, sin = self.rope(positions)
        x = F.embedding(input_ids, self.embed.detach())

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
        column_scale = torch.repeat_interleave(torch.tensor([s.scale for s in segments], dtype=x.dtype),
                                               torch.tensor(ranks))
        block = (owner[:, None] == column_owner[None, :]).to(x.dtype) * column_scale

        def delta(y: torch.Tensor, inp: torch.Tensor, li: int, name: str) -> torch.Tensor:
            """y plus each segment's delta (a layer without adapters: y itself)."""
            abs_ = [seg.deltas.get((li, name)) for seg in segments]
            if any(ab is None for ab in abs_):
                return y  # the recipe leaves this layer out (for every segment: one recipe per batch)
            a = torch.cat([ab[0] for ab in abs_])  # [S r, in]
            b = torch.cat([ab[1] for ab in abs_], dim=1)  # [out, S r]
            return y + ((inp @ a.T) * block) @ b.T

        for li, L in enumerate(self.layers):
            h = F.rms_norm(x, (self.hidden,), L.ln1.detach(), self.eps)
            qkv = L.qkv.train_call(h)
            q, k, v = self.split_qkv(qkv, cos, sin)
            outs = []
            for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
                o = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                                   vs.transpose(0, 1)[None], is_causal=True,
                                                   enable_gqa=Hkv != H)
                outs.append(o[0].transpose(0, 1))
            flat = torch.cat(outs).reshape(T, H * D)
            x = x + L.o.train_call(flat)
            h = F.rms_norm(x, (self.hidden,), L.ln2.detach(), self.eps)
            gate, up = L.gu.train_call(h).split([I, I], dim=1)
            act = F.silu(delta(gate, h, li, "gate_proj")) * delta(up, h, li, "up_proj")
            down = L.down.train_call(act)
            x = x + delta(down, act, li, "down_proj")
        losses = []
        for seg in segments:
            at = torch.nonzero(seg.labels[1:] != -100).flatten()
            if at.numel() == 0:
                losses.append(x.new_zeros(()))
                continue
            hidden = F.rms_norm(x[seg.start + at], (self.hidden,), self.norm.detach(), self.eps)
            losses.append(F.cross_entropy(self.lm_head.train_call(hidden), seg.labels[1:][at]))
        return torch.stack(losses)


class _PooledDecode:
    """The step's single-token rows whose caches are slots of one pool, attended together.

    For pool slots lo..hi (every slot in the range, running or not) the keys and values
    of layer ``li`` are one strided view ``[hi-lo+1, Hkv, Lmax, D]``; each member's query
    goes in its slot's line of a padded ``[hi-lo+1, H, 1, D]`` query, and a mask lets it
    see exactly its own ``length + 1`` keys. Lines of slots that are not members
    see key 0 only (their output is discarded; an all-false mask line would give NaN).
    The keys and values of the new tokens are written with one indexed store per layer.
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
        self.tok = torch.tensor([s.start for s in members])
        self.slots = torch.tensor(slots)
        self.pos = torch.tensor([s.cache.length for s in members])
        self.rel = self.slots - self.lo
        n = hi - self.lo + 1
        seen = torch.ones(n, dtype=torch.long)  # key count per line
        seen[self.rel] = torch.tensor(lengths)
        hidden = (torch.arange(self.width)[None, :] >= seen[:, None])[:, None, None, :]
        # additive, made once per step: SDPA would convert a boolean mask at every layer
        self.mask = torch.zeros(hidden.shape, dtype=dtype).masked_fill_(hidden, float("-inf"))
        # the usual decode step: members are the step's first tokens and fill slots lo.. in
        # the same order, so their lines need no gathering (about 0.7 ms of a 28 ms batch-8 step)
        self.in_order = len(members) == n and torch.equal(self.tok, torch.arange(n)) and \
            torch.equal(self.rel, torch.arange(n))
        self.q = None if self.in_order else torch.zeros(n, heads, 1, head_dim, dtype=dtype)

    def __contains__(self, seg: Segment) -> bool:
        return id(seg) in self.members

    @classmethod
    def of(cls, segments: list[Segment], heads: int, head_dim: int, dtype) -> Optional["_PooledDecode"]:
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
        o = F.scaled_dot_product_attention(lines, keys[span, :, :self.width], values[span, :, :self.width],
                                           attn_mask=self.mask, enable_gqa=gqa)
        if self.in_order:
            out[:n] = o[:, :, 0]
        else:
            out[self.tok] = o[self.rel, :, 0]
