"""The CPU GEMM kernels: every kernel computes the same product and gradient, and the
start-up tuner keeps only the weight copies a chosen kernel reads."""

import pytest
import torch

from server.engine.kernels import KERNELS, _ONEDNN_LINEAR, _ONEDNN_REORDER, Proj, tune_kernels


def _forced(proj: Proj, kernel: str) -> Proj:
    proj.use((kernel,) * len(Proj.BUCKETS))
    return proj


@pytest.mark.parametrize("bias", [False, True])
def test_every_gemm_kernel_computes_the_same_product_at_every_row_count(bias):
    # the kernel chosen at start-up must not change what a projection computes
    assert _ONEDNN_LINEAR is not None and _ONEDNN_REORDER is not None, "the pinned torch has oneDNN's linear"
    torch.manual_seed(3)
    w, b = torch.randn(96, 40), (torch.randn(96) if bias else None)
    kept = w.clone()  # a weight the caller holds anyway (a tied lm_head's embedding)
    projs = [_forced(Proj(w, b), k) for k in KERNELS] + [_forced(Proj(kept, b, keep_rows=True), k) for k in KERNELS]
    assert projs[1].packed is not None or not Proj._mkl  # MKL as served: packed for a few rows
    assert projs[2].dnn_packed is not None and projs[0].packed is None and projs[0].dnn_packed is None
    # on oneDNN a kept weight gets no transposed copy; MKL's x @ t needs one
    assert projs[3].t.data_ptr() == projs[5].t.data_ptr() == kept.data_ptr() and not projs[3].t.is_contiguous()
    assert projs[4].t.is_contiguous() and projs[4].t.data_ptr() != kept.data_ptr()
    ref = torch.nn.functional.linear
    for n in (1, 3, 8, 40, 64, 65, 600):
        x = torch.randn(n, 40)
        for p in projs:
            torch.testing.assert_close(p(x), ref(x, w, b), atol=1e-4, rtol=1e-4)
        column_major = x.t().contiguous().t()  # same values, another layout
        for p in projs[0], projs[2], projs[3], projs[5]:
            torch.testing.assert_close(p(column_major), ref(x, w, b), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("keep_rows", [False, True])
@pytest.mark.parametrize("kernel", KERNELS)
def test_onednn_training_product_gives_the_plain_gradient(kernel, keep_rows):
    # LoRA training backpropagates to the input through frozen weights, on oneDNN where it is
    # faster (for a kept weight, through its transposed view: there is no transposed copy)
    torch.manual_seed(4)
    w, b = torch.randn(80, 48), torch.randn(80)
    x = torch.randn(33, 48)
    grads = []
    for k, keep in (("mkl", False), (kernel, keep_rows)):
        xi = x.clone().requires_grad_()
        y = _forced(Proj(w, b, keep_rows=keep), k).train_call(xi)
        (y * torch.linspace(-1, 1, 80)).square().sum().backward()
        grads.append((y.detach(), xi.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-4, rtol=1e-4)


def test_kernel_tuning_keeps_packed_copies_only_where_a_chosen_kernel_reads_them(monkeypatch):
    import time as time_mod
    clock = [0.0]
    cost = {"onednn": 10, "mkl": 10, "onednn_packed": 10}  # a fake clock: each product "takes" its cost

    def timed(kernel_fn):
        def call(self, kernel, x):
            clock[0] += cost[kernel]
            return kernel_fn(self, kernel, x)
        return call

    monkeypatch.setattr(Proj, "call_with", timed(Proj.call_with))
    monkeypatch.setattr(time_mod, "perf_counter", lambda: clock[0])
    monkeypatch.setenv("KNOWMUX_ONEDNN", "1")
    every = len(Proj.BUCKETS)

    def tuned(**costs):
        cost.update(costs)
        projs = [Proj(torch.randn(64, 32)) for _ in range(2)]
        assert all(p.packed is None and p.dnn_packed is None for p in projs)  # packed only once chosen
        return tune_kernels(projs), projs

    # a tie (or a win under 10%) keeps plain oneDNN, which needs no copy of the weights
    choice, projs = tuned(mkl=9.5, onednn_packed=9.5)
    assert choice == {(64, 32): ["onednn"] * every}
    assert all(p.kernels == ("onednn",) * every and p.packed is None and p.dnn_packed is None for p in projs)
    choice, projs = tuned(onednn_packed=5)
    assert choice == {(64, 32): ["onednn_packed"] * every}
    assert all(p.dnn_packed is not None and p.packed is None for p in projs)  # every projection of the shape
    choice, projs = tuned(mkl=1)
    assert choice == {(64, 32): ["mkl"] * every}
    assert all((p.packed is not None or not Proj._mkl) and p.dnn_packed is None for p in projs)

    # an lm_head serves one row per sequence: never timed at prefill sizes, it keeps its decode choice
    rows_seen = []
    monkeypatch.setattr(Proj, "call_with", lambda self, kernel, x: rows_seen.append(x.shape[0]))
    head = Proj(torch.randn(64, 32), few_rows=True)
    assert tune_kernels([head]) == {(64, 32): ["onednn"] * every}
    assert max(rows_seen) == Proj.PACKED_MAX_ROWS


def test_kernel_tuning_serves_without_the_blocked_layout_where_onednn_cannot_reorder(monkeypatch, caplog):
    import server.engine.kernels as kernels_mod

    def refuse(w, rows):
        raise RuntimeError("unsupported")

    monkeypatch.setattr(kernels_mod, "_ONEDNN_REORDER", refuse)
    monkeypatch.setenv("KNOWMUX_ONEDNN", "1")
    projs = [Proj(torch.randn(64, 32)) for _ in range(2)]
    choice = tune_kernels(projs)
    assert all(k in ("onednn", "mkl") for k in choice[(64, 32)])
    assert all(p.dnn_packed is None for p in projs) and "no blocked oneDNN layout" in caplog.text
    x = torch.randn(3, 32)
    torch.testing.assert_close(projs[0](x), x @ projs[0].t, atol=1e-4, rtol=1e-4)


def test_a_second_runner_of_the_same_shapes_reuses_the_kernel_choice(monkeypatch):
    """One choice per weight shape and process (kernels.TUNED): a server builds one runner,
    the tests a hundred tiny ones; the second is not timed again and serves the same kernels."""
    monkeypatch.setenv("KNOWMUX_ONEDNN", "1")
    memo: dict = {}
    first = [Proj(torch.randn(64, 32)) for _ in range(2)]
    chosen = tune_kernels(first, memo=memo)
    calls = []
    monkeypatch.setattr(Proj, "call_with", lambda self, kernel, x: calls.append(kernel))
    second = [Proj(torch.randn(64, 32)) for _ in range(2)]
    assert tune_kernels(second, memo=memo) == chosen and calls == []
    assert all(p.kernels == first[0].kernels for p in second)
    other = [Proj(torch.randn(48, 32))]  # a new shape is timed
    tune_kernels(other, memo=memo)
    assert calls
