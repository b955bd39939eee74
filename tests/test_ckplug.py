"""CK-PLUG: the reweighting as a pure function, the paired-row decode, the API."""

import math

import httpx
import pytest
import torch

from server.decoding.ckplug import ckplug_step, plausible
from server.engine.model import LlamaRunner, Segment
from server.engine.types import GenRequest, RowSpec, SamplingParams
from server.options import parse_alpha
from tests.tiny import tiny_engine, tiny_model


def lsm(x):
    return torch.log_softmax(torch.tensor(x, dtype=torch.float32), -1)


def entropy(logits_kept):
    p = torch.softmax(torch.tensor(logits_kept, dtype=torch.float64), -1)
    return float(-(p * p.log()).sum())


def test_filter_keeps_top10_or_within_ln_001_of_the_max():
    # one dominant token: everything else is more than ln(100) below it, so only the top 10 survive
    z = torch.tensor([20.0] + [float(-i) for i in range(1, 20)])
    keep = plausible(torch.log_softmax(z, -1))
    assert keep.tolist() == [True] * 10 + [False] * 10
    # a flat head: 12 tokens within ln(100) of the max are all kept, more than 10
    z = torch.tensor([5.0] * 12 + [-10.0] * 8)
    assert plausible(torch.log_softmax(z, -1)).sum() == 12


# ---- the paper's equations, transcribed once more, straight, in float64 -------------------
def paper_reference(zc, zp, alpha, epsilon=0.0, k=10):
    """Bi et al. 2025, Eqs. 3-11, read off the page: H over the whole vocabulary (log2),
    CG = H(p(x|Xq)) - H(p(x|Xr+Xq)); where CG < eps |H_c|: softmax of alpha q_para +
    (1 - alpha) q_cont on V_head (top-k of q_para U top-k of q_cont), else p(x|Xr+Xq);
    adaptive alpha = H_c / (H_p + H_c). Returns (probabilities, reweighted)."""
    import numpy as np

    zc, zp = np.asarray(zc, dtype=np.float64), np.asarray(zp, dtype=np.float64)
    p_c, p_p = np.exp(zc - zc.max()), np.exp(zp - zp.max())
    p_c, p_p = p_c / p_c.sum(), p_p / p_p.sum()
    H = lambda p: float(-(p[p > 0] * np.log2(p[p > 0])).sum())  # noqa: E731
    h_c, h_p = H(p_c), H(p_p)
    if not h_p - h_c < epsilon * abs(h_c):
        return p_c, False
    a = h_c / (h_p + h_c) if alpha == "adaptive" else alpha
    q_para, q_cont = np.log(p_p), np.log(p_c) - np.log(p_p)
    head = set(np.argsort(-q_para)[:k]) | set(np.argsort(-q_cont)[:k])
    f = np.full_like(zc, -np.inf)
    for i in head:
        f[i] = a * q_para[i] + (1 - a) * q_cont[i]
    e = np.exp(f - f.max())
    return e / e.sum(), True


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, "adaptive"])
@pytest.mark.parametrize("epsilon", [0.0, -0.3])
def test_the_paper_variant_is_the_papers_equations_on_random_logits(alpha, epsilon):
    g = torch.Generator().manual_seed(7)
    seen = set()
    for trial in range(200):
        vocab = 50 + trial % 200
        zc = torch.randn(vocab, generator=g) * float(1 + trial % 4)
        zp = torch.randn(vocab, generator=g) * float(1 + (trial // 4) % 4)
        r = ckplug_step(zc, zp, alpha, "paper", epsilon)
        ref, reweighted = paper_reference(zc.tolist(), zp.tolist(), alpha, epsilon)
        assert r.reweighted == reweighted
        seen.add(reweighted)
        got = torch.softmax(r.logits.double(), -1)
        torch.testing.assert_close(got, torch.tensor(ref), atol=2e-5, rtol=1e-4)
    assert seen == {True, False}  # both branches were exercised


def test_the_appendix_threshold_at_minus_one_or_below_never_reweights():
    """Eq. 11 as printed: CG < eps |H_c| is H_p < (1 + eps) H_c, and entropies are >= 0, so
    the appendix's eps = -1, -2, -3 never reweight (measured on its own grounds in RESULTS)."""
    g = torch.Generator().manual_seed(3)
    for _ in range(100):
        zc, zp = torch.randn(80, generator=g) * 3, torch.randn(80, generator=g) * 3
        assert not any(ckplug_step(zc, zp, 0.0, "paper", eps).reweighted for eps in (-1.0, -2.0, -3.0))


def test_the_paper_variant_leaves_unconflicted_steps_untouched():
    zc = torch.tensor([8.0, 1.0, 0.0] + [-3.0] * 40)  # the context makes the model surer: CG > 0
    zp = torch.tensor([1.0, 1.0, 1.0] + [-3.0] * 40)
    r = ckplug_step(zc, zp, 0.3)
    assert r.cg > 0 and not r.reweighted
    assert torch.isfinite(r.logits).all()  # no head cut: p(x | context) as it is
    torch.testing.assert_close(r.logits, torch.log_softmax(zc, -1))


def test_the_paper_variants_adaptive_weights_sum_to_one():
    zc = torch.tensor([1.0, 1.0, 0.5, 0.0] + [-4.0] * 30)
    zp = torch.tensor([6.0, 1.0, 0.0, 0.0] + [-4.0] * 30)
    r = ckplug_step(zc, zp, "adaptive")
    assert r.reweighted
    a = r.h_context / (r.h_context + r.h_memory)
    fixed = ckplug_step(zc, zp, a)  # the same step with that alpha given
    torch.testing.assert_close(r.logits, fixed.logits)


def test_hand_computed_entropies_cg_and_fixed_alpha_mix():
    # 12 tokens; with context the model is sure of token 0, without it it spreads over 0..2
    zc = [8.0, 1.0, 0.0] + [-30.0] * 9
    zp = [1.0, 1.0, 1.0] + [-30.0] * 9
    r = ckplug_step(torch.tensor(zc), torch.tensor(zp), alpha=0.3, variant="kept-set")
    # kept: top 10 of each distribution (ties broken either way, the union covers 0..9 at least)
    keep = torch.isfinite(r.logits)
    assert keep[:3].all()
    kept = keep.nonzero().flatten().tolist()
    h_c = entropy([zc[i] for i in kept])
    h_p = entropy([zp[i] for i in kept])
    assert r.h_context == pytest.approx(h_c, abs=1e-4) and r.h_memory == pytest.approx(h_p, abs=1e-4)
    assert r.cg == pytest.approx(h_p - h_c, abs=1e-4) and r.cg > 0
    assert not r.reweighted  # the context made the model surer: z = z_c
    lc = lsm(zc)
    torch.testing.assert_close(r.logits[keep], lc[keep])

    # reversed roles: the context makes the model less sure (CG < 0): mixed
    r = ckplug_step(torch.tensor(zp), torch.tensor(zc), alpha=0.3, variant="kept-set")
    assert r.cg < 0 and r.reweighted
    lcx, lpx = lsm(zp), lsm(zc)
    expected = 0.3 * lpx + 0.7 * (lcx - lpx)
    torch.testing.assert_close(r.logits[keep], expected[keep])
    assert torch.isinf(r.logits[~keep]).all()


def test_adaptive_formula():
    zc = [1.0, 1.0, 0.5, 0.0] + [-40.0] * 8
    zp = [6.0, 1.0, 0.0, 0.0] + [-40.0] * 8
    r = ckplug_step(torch.tensor(zc), torch.tensor(zp), alpha="adaptive", variant="kept-set")
    assert r.cg < 0 and r.reweighted
    hc, hp = r.h_context, r.h_memory
    nf = 1 + abs(hc - hp) / (hc + hp)
    lc, lp = lsm(zc), lsm(zp)
    expected = (2 * hc / (hc + hp * nf)) * lp + (2 * hp / (hc + hp * nf)) * (lc - lp)
    keep = torch.isfinite(r.logits)
    torch.testing.assert_close(r.logits[keep], expected[keep])


def test_alpha_half_is_plain_rag_and_the_ends_trust_memory_or_context():
    torch.manual_seed(0)
    for _ in range(50):
        zc, zp = torch.randn(300) * 3, torch.randn(300) * 3
        r = ckplug_step(zc, zp, 0.5, condition="code", variant="kept-set")
        assert int(r.logits.argmax()) == int(zc.argmax())
    zc = torch.tensor([2.0, 1.9, 1.8] + [-20.0] * 20)  # unsure with context, prefers 0
    zp = torch.tensor([0.0, 9.0, 0.0] + [-20.0] * 20)  # sure without: 1
    for variant in ("paper", "kept-set"):
        assert int(ckplug_step(zc, zp, 1.0, variant=variant).logits.argmax()) == 1  # memory
        assert int(ckplug_step(zc, zp, 0.0, variant=variant).logits.argmax()) == 0  # context


def test_code_condition_adjusts_where_cg_is_below_h_context():
    zc = [8.0, 1.0, 0.0] + [-30.0] * 9
    zp = [1.0, 1.0, 1.0] + [-30.0] * 9
    paper = ckplug_step(torch.tensor(zc), torch.tensor(zp), 0.3, "paper", variant="kept-set")
    code = ckplug_step(torch.tensor(zc), torch.tensor(zp), 0.3, "code", variant="kept-set")
    assert paper.cg > 0 and not paper.reweighted
    assert code.reweighted == (code.cg < code.h_context)


@pytest.mark.parametrize("bad", [-0.1, 1.5, "high", True, float("nan"), [0.5]])
def test_parse_alpha_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        parse_alpha(bad)


def test_parse_alpha_accepts():
    assert parse_alpha(None) == "adaptive" and parse_alpha("adaptive") == "adaptive"
    assert parse_alpha(0) == 0.0 and parse_alpha(1) == 1.0 and parse_alpha(0.25) == 0.25


def test_two_row_batched_decode_equals_two_separate_single_stream_decodes():
    """The engine runs both streams as rows of one batch; replaying them one row at a time
    with the same runner gives the same logits at every step and the same tokens."""
    from server.decoding.ckplug import CKPlugHook

    with_ctx, without = list(range(30, 70)), [5, 6, 7, 8, 9]
    eng = tiny_engine()
    seen = []
    hook = CKPlugHook(alpha=0.2, condition="code")

    def recording(lg):
        seen.append(lg.clone())
        return hook(lg)

    tokens = []
    eng.worker.submit(GenRequest("p", [RowSpec(with_ctx), RowSpec(without)],
                                 SamplingParams(max_tokens=8, ignore_eos=True), recording),
                      lambda ev: tokens.extend(ev.token_ids))
    while eng.worker.step():
        pass
    assert len(tokens) == 8 and hook.reweighted > 0

    runner = LlamaRunner(tiny_model())
    ca, cb = runner.new_cache(64), runner.new_cache(64)
    za = runner.forward(torch.tensor(with_ctx), [Segment(ca, 0, len(with_ctx), want_logits=True)])[0]
    zb = runner.forward(torch.tensor(without), [Segment(cb, 0, len(without), want_logits=True)])[0]
    for step, tok in enumerate(tokens):
        torch.testing.assert_close(seen[step][0], za, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(seen[step][1], zb, atol=1e-4, rtol=1e-4)
        assert int(ckplug_step(za, zb, 0.2, "code").logits.argmax()) == tok
        za = runner.forward(torch.tensor([tok]), [Segment(ca, 0, 1, want_logits=True)])[0]
        zb = runner.forward(torch.tensor([tok]), [Segment(cb, 0, 1, want_logits=True)])[0]


DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."}]
ASK = [{"role": "user", "content": "Where does Zorbl live?"}]


def test_api_trace_and_validation(make_server):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS})
    c = srv.client()
    r = c.chat.completions.create(model="knowmux", messages=ASK, max_tokens=6, temperature=0,
                                  extra_headers={"X-Strategy": "rag+ckplug"},
                                  extra_body={"ckplug_alpha": 0.25, "ckplug_trace": True, "ignore_eos": True})
    kx = r.model_extra["knowmux"]
    assert kx["strategy"] == "rag+ckplug" and kx["retrieved"][0]["id"] == "zorbl"
    ck = kx["ckplug"]
    assert ck["alpha"] == 0.25 and ck["condition"] == "paper" and len(ck["trace"]) == 6 == ck["steps"]
    assert ck["variant"] == "paper" and ck["epsilon"] == 0.0
    assert all(set(t) == {"cg", "reweighted"} and math.isfinite(t["cg"]) for t in ck["trace"])
    for body, param in [({"ckplug_alpha": 2}, "ckplug_alpha"), ({"ckplug_alpha": "lots"}, "ckplug_alpha"),
                        ({"ckplug_condition": "vibes"}, "ckplug_condition")]:
        resp = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "rag+ckplug"},
                          json={"model": "knowmux", "messages": ASK, **body})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == param
    resp = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "direct+ckplug"},
                      json={"model": "knowmux", "messages": ASK})
    assert resp.status_code == 400 and "no such context" in resp.json()["error"]["message"]


def test_kv_ckplug_runs_on_injected_caches_and_alpha_half_is_plain_kv(make_server):
    srv = make_server()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS})
    c = srv.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=6, temperature=0)
    kv = c.chat.completions.create(extra_headers={"X-Strategy": "kv"}, extra_body={"top_k": 1, "ignore_eos": True}, **kw)
    # alpha 0.5 gives half of log p(context) on the kept set, which holds the context's top
    # tokens in the kept-set variant (in the paper's, V_head need not hold the argmax)
    half = c.chat.completions.create(extra_headers={"X-Strategy": "kv+ckplug"},
                                     extra_body={"top_k": 1, "ignore_eos": True, "ckplug_alpha": 0.5,
                                                 "ckplug_variant": "kept-set"}, **kw)
    kx = half.model_extra["knowmux"]
    assert kx["strategy"] == "kv+ckplug" and kx["kv"]["prefilled_tokens"] < kx["kv"]["injected_tokens"]
    assert kx["ckplug"]["steps"] == 6
    assert half.choices[0].message.content == kv.choices[0].message.content
