"""The CPU GEMM kernels of the torch engine: a projection's weight kept for fast matmuls,
with the kernel (oneDNN in place, MKL packed, oneDNN blocked) chosen per row count by
timing them at start on the real, cold weights (``tune_kernels``).

A projection is called as ``proj(x)``: x [T, in] -> [T, out]; the runner never names a
kernel. The timed kernels are the float32 CPU backend; on other devices and in other
dtypes every projection serves through plain ``F.linear`` (``use_linear``), which cuBLAS
and torch's CPU kernels already choose well for.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


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


class Proj:
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
        if kernel == "linear":
            return F.linear(x, self.w, self.bias)
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
        if self.kernels and self.kernels[-1] in ("onednn", "onednn_packed"):
            return _FrozenOneDNNLinear.apply(x, self)
        return self.plain(x)


class _FrozenOneDNNLinear(torch.autograd.Function):
    """y = x W^T + b through oneDNN (plain or blocked weight, as the projection serves
    prefill), with the gradient to x only: dx = dy W, which is oneDNN's linear of dy
    against t = W^T (so both directions read stored weights in place)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, proj: Proj) -> torch.Tensor:
        ctx.proj = proj
        return proj.call_with(proj.kernels[-1], x)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return _ONEDNN_LINEAR(dy.contiguous(), ctx.proj.t, None, "none", [], ""), None


ROW_BUCKETS = Proj.BUCKETS  # the row counts a kernel choice is made for (each serves up to that many rows)


def _bucket(n: int) -> int:
    """Index of the smallest of ``Proj.BUCKETS`` that holds n rows (the last for more)."""
    for i, b in enumerate(Proj.BUCKETS):
        if n <= b:
            return i
    return len(Proj.BUCKETS) - 1


# Kernel choices made in this process, by weight shape: a later runner over the same shapes
# reuses them instead of timing again (``tune_kernels(memo=TUNED)``). A server builds one
# runner; the test suite builds a hundred tiny ones, 1-2 s of timing each.
TUNED: dict = {}


def tune_kernels(projs: list[Proj], repeats: int = 3, memo: Optional[dict] = None) -> dict:
    """Time the ``KERNELS`` against each other for each distinct weight shape at each
    row bucket, on the real weights, and give every projection of that shape the fastest
    (plain oneDNN unless another is more than 10% faster: the others cost a copy of the
    weights). Serving reads every weight cold (a step streams the whole model through
    the caches), so a kernel is timed over all the shape's weights back to back, as a
    step calls them; timing one warm weight misled (for SmolLM2's 576x576 o_proj at one
    row it chose MKL, slower cold: 0.046 vs 0.036 ms), and so did one weight after a
    cache flush (every call 1.5-2x slower than in a step). Packed copies are built for
    one shape at a time and kept only where a chosen kernel reads them. Off with
    KNOWMUX_ONEDNN=0 or where torch has no oneDNN (MKL everywhere, packed). With ``memo``
    (a dict), a shape whose choice it holds is not timed again, and new choices are added
    to it. Logs and returns {(out, in): [bucket -> kernel]}."""
    import os
    import time

    if os.environ.get("KNOWMUX_ONEDNN", "1") == "0" or _ONEDNN_LINEAR is None:
        for p in projs:
            p.use(("mkl",) * len(Proj.BUCKETS))
        return {}
    kernels = [k for k in KERNELS if k != "onednn_packed" or _ONEDNN_REORDER is not None]
    by_shape: dict = {}
    for p in projs:
        by_shape.setdefault((tuple(p.t.shape[::-1]), p.w.is_contiguous()), []).append(p)
    out = {}
    with torch.inference_mode():
        for (shape, contiguous), group in by_shape.items():
            key = (shape, contiguous, all(p.few_rows for p in group), group[0].t.dtype)
            if memo is not None and key in memo:
                out[shape] = memo[key]
                for p in group:
                    p.use(memo[key])
                continue
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
            for rows in Proj.BUCKETS:
                if rows > Proj.PACKED_MAX_ROWS and all(p.few_rows for p in group):
                    choice.append(choice[-1])  # never served: not worth timing (0.3 s per kernel for an lm_head)
                    continue
                x = torch.randn(rows, shape[1])
                # prefill-sized products are compute-bound: two weights tell as much as all
                members = group if rows <= Proj.PACKED_MAX_ROWS else group[:2]
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
            if memo is not None:
                memo[key] = choice
            for p in group:
                p.use(choice)
    log.info("GEMM kernel per weight shape and row bucket %s: %s", Proj.BUCKETS, out or "MKL only")
    return out


def use_linear(projs: list[Proj]) -> dict:
    """Serve every projection through ``F.linear`` (the backend for GPUs and for dtypes other
    than float32, where the timed CPU kernels do not apply). Returns {} (nothing timed)."""
    for p in projs:
        p.use(("linear",) * len(Proj.BUCKETS))
        if not p.w.is_contiguous():  # F.linear on a transposed view: bf16 on the CPU 4-8x slower
            p.w = p.t.t().contiguous()
            p.t = p.w.t()  # a view again: one copy of the weights
    log.info("GEMM kernels: F.linear on %s %s", projs[0].t.device if projs else "-",
             projs[0].t.dtype if projs else "-")
    return {}


def return_free_memory() -> None:
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
