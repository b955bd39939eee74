"""Sampling and what a token carries: logprobs, logit bias and penalties, seeded
sampling, stop strings and the incremental detokenizer."""

import pytest
import torch

from server.engine.aio import generate_blocking
from server.engine.types import GenRequest, RowSpec, SamplingParams
from server.errors import InvalidRequest
from tests.engine_util import Collector, PROMPTS, greedy
from tests.tiny import tiny_engine, tiny_model, tiny_tokenizer


def test_logprobs_are_the_models_log_softmax_with_the_top_k_best_first():
    model = tiny_model()
    prompt = PROMPTS[0]
    eng = tiny_engine()
    c = Collector()
    eng.worker.submit(GenRequest("lp", [RowSpec(prompt)], greedy(6, logprobs=3)), c)
    while eng.worker.step():
        pass
    lps = [lp for ev in c.events for lp in ev.logprobs]
    assert [lp.token_id for lp in lps] == c.tokens and len(lps) == 6
    ref = torch.log_softmax(model(torch.tensor([prompt + c.tokens])).logits[0].detach(), dim=-1)
    for i, lp in enumerate(lps):
        row = ref[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(float(row[lp.token_id]), abs=1e-4)
        values, ids = row.topk(3)
        assert [t for t, _ in lp.top] == ids.tolist()  # greedy: the chosen token leads
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-4)


def test_logprobs_follow_the_logits_hook_and_are_off_unless_asked():
    eng = tiny_engine()

    def favour_seven(lg):  # a hook such as CK-PLUG's decides the distribution tokens come from
        out = lg[0].clone()
        out[7] += 50.0
        return out

    asked, plain = Collector(), Collector()
    eng.worker.submit(GenRequest("h", [RowSpec(PROMPTS[0])], greedy(3, logprobs=0), favour_seven), asked)
    eng.worker.submit(GenRequest("p", [RowSpec(PROMPTS[0])], greedy(3)), plain)
    while eng.worker.step():
        pass
    lps = [lp for ev in asked.events for lp in ev.logprobs]
    assert [lp.token_id for lp in lps] == [7, 7, 7]
    assert all(lp.logprob > -1e-3 and lp.top == () for lp in lps)
    assert all(ev.logprobs == [] for ev in plain.events)


def test_logit_bias_and_penalties_change_the_choice_as_openai_defines_them():
    from server.engine.sampling import adjust

    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    p = SamplingParams(max_tokens=1, presence_penalty=0.5, frequency_penalty=0.25, logit_bias=((3, 4.0),))
    # token 1 generated twice, token 2 once: 3 - 0.5 - 2 * 0.25, 2 - 0.5 - 0.25; token 3 biased
    torch.testing.assert_close(adjust(logits, p, [1, 2, 1]), torch.tensor([1.0, 2.0, 1.25, 4.0]))
    assert adjust(logits, SamplingParams(max_tokens=1), [1, 2]) is logits
    assert logits.tolist() == [1.0, 3.0, 2.0, 0.0]

    # through the worker: the tiny model repeats itself on this prompt; a presence penalty
    # of 2 stops it (no token twice), and a large bias forces one token throughout
    out = {name: Collector() for name in ("plain", "presence", "bias")}
    eng = tiny_engine()
    for name, kw in (("plain", {}), ("presence", {"presence_penalty": 2.0}), ("bias", {"logit_bias": ((5, 30.0),)})):
        eng.worker.submit(GenRequest(name, [RowSpec(PROMPTS[2])], greedy(12, **kw)), out[name])
    while eng.worker.step():
        pass
    assert len(set(out["plain"].tokens)) < 12 and len(set(out["presence"].tokens)) == 12
    assert out["presence"].tokens[:2] == out["plain"].tokens[:2]  # nothing to penalise before a repeat
    assert out["bias"].tokens == [5] * 12
    with pytest.raises(InvalidRequest, match="logit_bias"):
        eng.worker.submit(GenRequest("v", [RowSpec(PROMPTS[2])], greedy(2, logit_bias=((10**6, 1.0),))), Collector())


def test_seeded_sampling_is_reproducible():
    eng = tiny_engine()
    eng.start()
    try:
        params = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.9, seed=7, ignore_eos=True)
        a = generate_blocking(eng, GenRequest("a", [RowSpec(PROMPTS[0])], params), timeout=60)
        b = generate_blocking(eng, GenRequest("b", [RowSpec(PROMPTS[0])], params), timeout=60)
        assert a == b
    finally:
        eng.shutdown()


def test_stop_strings_and_streamed_text_join_to_the_full_text():
    eng = tiny_engine()
    eng.start()
    try:
        text, finish = generate_blocking(eng, GenRequest("a", [RowSpec(PROMPTS[1])], greedy(30)), timeout=60)
        assert finish == "length" and len(text) > 0
        stop = text[5:8]
        c = Collector()
        eng.submit(GenRequest("b", [RowSpec(PROMPTS[1])], greedy(30, stop=(stop,))), c)
        assert c.done.wait(60)
        assert c.finish == "stop"
        assert c.text == text[:text.index(stop)]
    finally:
        eng.shutdown()


def test_detokenizer_holds_back_partial_stop_strings_and_utf8():
    from server.engine.detok import IncrementalDetokenizer

    tok = tiny_tokenizer()
    ids = tok.encode("héllo END tail", add_special_tokens=False)
    d = IncrementalDetokenizer(tok, stop=("END",))
    out = "".join(d.add(i) for i in ids if not d.stopped)
    assert d.stopped and out == "héllo "
    d = IncrementalDetokenizer(tok)
    pieces = [d.add(i) for i in tok.encode("né", add_special_tokens=False)]
    assert "\ufffd" not in "".join(pieces) and "".join(pieces) + d.flush() == "né"


def test_eos_finishes_with_stop():
    eng = tiny_engine()
    c = Collector()
    eos = next(iter(eng.eos_ids))
    # force eos on the third token through the logits hook
    calls = []

    def hook(lg):
        calls.append(1)
        out = lg[0].clone()
        if len(calls) == 3:
            out[eos] = 1e9
        return out

    eng.worker.submit(GenRequest("a", [RowSpec(PROMPTS[0])], greedy(20, ignore_eos=False), hook), c)
    while eng.worker.step():
        pass
    assert c.finish == "stop" and c.events[-1].completion_tokens == 3
