"""Parametric RAG on a tiny random model: combination, batching, training, the bank, the API."""


import httpx
import pytest
import torch

from adapters.augment import cloze_pairs, parse_qa
from adapters.bank import AdapterBank, AdapterError, adapter_key
from adapters.recipe import get_recipe
from adapters.train import LoraTrainer, Sequence, training_sequences
from server.engine.lora import AdapterSet
from server.engine.model import LlamaRunner, Segment
from server.engine.types import GenRequest, RowSpec, SamplingParams
from tests.conftest import wait_for_job
from tests.tiny import tiny_engine, tiny_model, tiny_tokenizer

SHAPES = {"gate_proj": (128, 64), "up_proj": (128, 64), "down_proj": (64, 128)}


def random_peft_adapters(model, names, seed=0):
    """A peft model with adapters ``names``, B initialised non-zero so each has a delta."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=2, lora_alpha=32, lora_dropout=0.0, target_modules=["gate_proj", "up_proj", "down_proj"])
    pm = get_peft_model(model, cfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return pm


def as_adapter_set(bank, key, name):
    w = bank.load(key, name, "fp", SHAPES)
    return AdapterSet({k: (a, b * w.scale) for k, (a, b) in w.deltas.items()}, name=name)


def peft_writer(pm, name):
    """Save one adapter of a peft model in the bank's layout (peft puts non-default ones in a subfolder)."""

    def write(folder):
        pm.save_pretrained(str(folder), selected_adapters=[name])
        sub = folder / name
        if sub.is_dir():
            for f in sub.iterdir():
                f.rename(folder / f.name)
            sub.rmdir()

    return write


def test_combination_equals_peft_cat_of_the_same_adapters(tmp_path):
    pm = random_peft_adapters(tiny_model(), ["doc1", "doc2"])
    bank = AdapterBank(tmp_path)
    for n in ("doc1", "doc2"):
        bank.save(n, peft_writer(pm, n), {}, {"model": "fp"})
    combo = AdapterSet.combine([as_adapter_set(bank, "doc1", "doc1"), as_adapter_set(bank, "doc2", "doc2")], [1.0, 0.5])
    pm.add_weighted_adapter(["doc1", "doc2"], [1.0, 0.5], "combo", combination_type="cat")
    pm.set_adapter("combo")
    ids = torch.tensor(list(range(30, 60)))
    with torch.no_grad():
        ref = pm(input_ids=ids[None]).logits[0, -1]
    runner = LlamaRunner(tiny_model())  # the same base weights (same seed)
    cache = runner.new_cache(40)
    got = runner.forward(ids, [Segment(cache, 0, len(ids), combo, True)])[0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
    base = LlamaRunner(tiny_model()).forward(ids, [Segment(LlamaRunner(tiny_model()).new_cache(40), 0, len(ids),
                                                           None, True)])[0]
    assert float((got - base).abs().max()) > 1e-2  # the adapters really change the output


def test_rows_with_different_adapter_sets_share_a_batch():
    pm = random_peft_adapters(tiny_model(), ["default"], seed=3)
    sd = {k: v for k, v in pm.state_dict().items() if "lora_" in k}
    deltas = {}
    for k, v in sd.items():
        layer = int(k.split("layers.")[1].split(".")[0])
        proj = k.split(".mlp.")[1].split(".")[0]
        deltas.setdefault((layer, proj), {})["A" if "lora_A" in k else "B"] = v
    one = AdapterSet({k: (d["A"], d["B"] * 16) for k, d in deltas.items()}, "one")
    two = AdapterSet({k: (d["A"] * -1, d["B"] * 8) for k, d in deltas.items()}, "two")

    def run(specs):
        eng = tiny_engine()
        out = {}
        for name, aset in specs:
            out[name] = []
            eng.worker.submit(GenRequest(name, [RowSpec(list(range(40, 60)), adapters=aset)],
                                         SamplingParams(max_tokens=8, ignore_eos=True)),
                              lambda ev, name=name: out[name].extend(ev.token_ids))
        while eng.worker.step():
            pass
        return out

    alone = {**run([("one", one)]), **run([("two", two)]), **run([("none", None)])}
    assert run([("one", one), ("two", two), ("none", None)]) == alone
    assert alone["one"] != alone["none"] or alone["two"] != alone["none"]


def test_training_on_an_invented_fact_lowers_its_loss():
    tok = tiny_tokenizer()
    recipe = get_recipe("passage-4ep", epochs=6, lr=3e-3)
    trainer = LoraTrainer(tiny_model(), tok, recipe, "fp")
    q, a = "Who is Zorbl?", "a purple cat"
    before = trainer.answer_logprob(q, a)
    stats = trainer.train([Sequence(q, a), Sequence("", "Zorbl is a purple cat.")])
    after = trainer.answer_logprob(q, a)
    assert stats["steps"] == 12 and after > before + 0.5
    assert trainer.answer_logprob(q, a, with_adapter=False) == pytest.approx(before, abs=1e-4)
    # every document starts from the same init: a reset gives the untrained answer back
    trainer.reset()
    assert trainer.answer_logprob(q, a) == pytest.approx(before, abs=1e-4)


@pytest.mark.parametrize("preset", ["passage-4ep", "passage-4ep-top-half"])
def test_training_many_documents_at_once_equals_training_each_alone(preset):
    """train_many (the engine's packed forward, several adapters per batch, steps cut into
    pieces) gives each document the adapter peft's own training gives it alone; also when
    the recipe puts adapters on the upper layers only."""
    import copy

    from peft import get_peft_model_state_dict

    tok = tiny_tokenizer()
    recipe = get_recipe(preset, epochs=2, lr=3e-3)
    served = tiny_model()
    runner = LlamaRunner(served)
    model = copy.deepcopy(served)
    for p in model.parameters():
        p.data = p.data.contiguous()
    trainer = LoraTrainer(model, tok, recipe, "fp")
    docs = [[Sequence("Who is Zorbl?", "a purple cat"), Sequence("", "Zorbl is a purple cat.")],
            [Sequence("Where is Quib?", "under the old bridge"), Sequence("What does Quib eat?", "plums"),
             Sequence("", "Quib lives under the old bridge and eats plums.")]]
    alone = []
    for seqs in docs:
        stats = trainer.train(seqs)
        alone.append(({k: v.detach().clone() for k, v in get_peft_model_state_dict(trainer.model).items()}, stats))
    together = trainer.train_many(docs, runner, tokens_per_call=lambda: 40)  # forces several pieces per step
    for (want, s_want), (got, s_got) in zip(alone, together):
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=2e-4, rtol=2e-3)
        assert s_got["steps"] == s_want["steps"] and s_got["trained_with"] == 2
        assert s_got["first_loss"] == pytest.approx(s_want["first_loss"], rel=1e-4)
        assert s_got["last_epoch_loss"] == pytest.approx(s_want["last_epoch_loss"], rel=1e-3)
    assert any(float(v.abs().max()) > 0 for k, v in together[0][0].items() if "lora_B" in k)  # it trained
    layers = {int(k.split("layers.")[1].split(".")[0]) for k in together[0][0]}
    assert layers == ({0, 1} if recipe.top_layers == 1.0 else {1})  # the tiny model has 2 layers
    assert all(p.grad is None for p in served.parameters())  # the served weights got no gradient


def test_recipe_sequences_and_augmentation_parsing():
    from adapters.augment import Augmentation

    aug = Augmentation("P.", "R.", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    seqs = training_sequences(aug, get_recipe("paper-answer-loss"))
    assert [s.prompt.split("\n\n")[0] for s in seqs[:4]] == ["P.", "R.", "P.", "R."] and len(seqs) == 5
    assert seqs[4].prompt == "Question: q2"
    assert len(training_sequences(aug, get_recipe("passage-4ep"))) == 6
    lean = training_sequences(aug, get_recipe("passage-4ep-lean"))
    assert [s.prompt.split("\n\n")[0] for s in lean] == ["P.", "P.", "Question: q2", ""] and lean[3].target == "P."
    # a setting added later leaves the keys of adapters stored before it unchanged
    assert get_recipe("passage-4ep").fingerprint() == "bada754289f593a8"
    assert parse_qa('junk [{"question": "Q1?", "answer": "A1"}] tail') == [{"question": "Q1?", "answer": "A1"}]
    assert parse_qa('{"question": "Q?", "answer": "A",') == [{"question": "Q?", "answer": "A"}]
    assert parse_qa("no pairs here") == []
    pairs = cloze_pairs("Zorbl is a purple cat. It lives on the moon base Tycho.", 3)
    assert len(pairs) == 3 and pairs[0]["answer"] == "a purple cat." and pairs[2]["question"].startswith("Complete")
    assert len(cloze_pairs("A single sentence about the moon base Tycho.", 3)) == 3
    assert len(cloze_pairs("Four words only here.", 3)) == 2  # only two distinct cut points


def test_the_paper_recipe_trains_as_the_papers_code_does():
    """PRAG's released code: its prompt, "The answer is X." as the target, no end token,
    and labels on every token of the sequence (passage, question and answer)."""
    from adapters.augment import Augmentation
    from adapters.train import encode

    aug = Augmentation("P.", "R.", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    seqs = training_sequences(aug, get_recipe("paper"))
    assert len(seqs) == 5 and all(s.whole and not s.eos for s in seqs)
    assert seqs[0].prompt == ("You should answer the question by referring to the knowledge provided below and "
                              "integrating your own knowledge.\nPassage 1: P.\n\n\nQuestion: q0?")
    assert seqs[1].prompt.endswith("Passage 1: R.\n\n\nQuestion: q0?") and seqs[0].target == "The answer is a0."
    assert seqs[4].prompt.endswith("own knowledge.\n\n\nQuestion: q2?")  # QA3: no passage
    tok = tiny_tokenizer()
    ids, labels = encode(tok, seqs[0])
    assert labels.tolist() == ids.tolist()  # the loss on every token
    assert tok.decode(ids).endswith("<|im_start|>assistant\nThe answer is a0.")
    ids, labels = encode(tok, training_sequences(aug, get_recipe("paper-answer-loss"))[0])
    assert (labels == -100).sum() > 0 and labels[-1] == tok.eos_token_id  # the old one: the answer only
    r = get_recipe("paper")
    assert (r.rank, r.alpha, r.lr, r.epochs, r.augment_temperature, r.max_new_tokens) == (2, 32.0, 3e-4, 1, 0.7, 512)


def test_the_paper_augmentation_asks_again_until_its_qa_list_parses():
    from adapters.augment import PRAG_QA_PROMPT, augment, parse_qa_strict

    good = ('Sure: [{"question": "Q1", "answer": "A1", "full_answer": "F1"}, {"question": "Q2", "answer": 1988, '
            '"full_answer": "F2"}, {"question": "Q3", "answer": null, "full_answer": "F3"}] trailing')
    assert [p["answer"] for p in parse_qa_strict(good)] == ["A1", "1988", "Unknown"]
    assert parse_qa_strict('[{"question": "Q1", "answer": "A1"}]') == []  # no full_answer, fewer than 3
    outputs = iter(["not json", '[{"question": "Q", "answer": "A"}]', good])
    asked = []

    def generate(prompt, n):
        asked.append(prompt)
        return "Rewritten." if prompt.startswith("Rewrite") else next(outputs)

    aug = augment("Zorbl is a purple cat.", generate, 512, paper=True, retries=100, parallel=1)
    assert aug.qa_attempts == 3 and [p["question"] for p in aug.qa] == ["Q1", "Q2", "Q3"]
    assert all(p["source"] == "model" for p in aug.qa)
    assert sum(p == PRAG_QA_PROMPT.format(passage="Zorbl is a purple cat.") for p in asked) == 3
    # out of retries: cloze pairs fill the list, so the document still gets an adapter
    aug = augment("Zorbl is a purple cat who lives on the moon.", lambda p, n: "no", 512, paper=True, retries=2)
    assert aug.qa_attempts == 3 and all(p["source"] == "cloze" for p in aug.qa)
    # asked 8 at a time (one engine batch): the first list that parses is kept, counted where it came
    calls = []

    def one_good(prompt, n):
        if prompt.startswith("Rewrite"):
            return "Rewritten."
        calls.append(prompt)
        return good if len(calls) == 5 else "no"

    aug = augment("Zorbl is a purple cat.", one_good, 512, paper=True, retries=100)
    assert len(calls) == 1 + 8 and 2 <= aug.qa_attempts <= 9 and [p["question"] for p in aug.qa] == ["Q1", "Q2", "Q3"]
    aug = augment("Zorbl is a purple cat.", lambda p, n: "no", 512, paper=True, retries=11)
    assert aug.qa_attempts == 12  # 1, then 8, then the 3 left


def test_augmentation_asks_for_the_rewrite_and_the_qa_pairs_at_once():
    # both generations in flight together: a batching engine decodes them in one batch
    import threading

    from adapters.augment import augment

    both = threading.Barrier(2, timeout=10)  # broken (an error) if the second never comes while the first waits

    def generate(prompt: str, max_tokens: int) -> str:
        both.wait()
        return '[{"question": "Who?", "answer": "Zorbl"}]' if "question" in prompt.lower() else "A rewrite."

    aug = augment("Zorbl is a purple cat. It lives on the moon base Tycho.", generate, 32)
    assert aug.rewrite == "A rewrite." and aug.qa[0] == {"question": "Who?", "answer": "Zorbl", "source": "model"}
    assert len(aug.qa) == 3  # filled with cloze pairs


def test_bank_detects_missing_truncated_and_foreign_adapters(tmp_path):
    pm = random_peft_adapters(tiny_model(), ["default"])
    bank = AdapterBank(tmp_path)
    key = adapter_key("fp", "recipe", "hash")
    bank.save(key, lambda folder: pm.save_pretrained(str(folder)), {"qa": []}, {"model": "fp"})
    assert set(p.name for p in bank.folder(key).iterdir()) >= {"adapter_config.json", "adapter_model.safetensors",
                                                                "augmentation.json", "knowmux.json"}
    assert bank.load(key, "doc", "fp", SHAPES).rank == 2
    with pytest.raises(AdapterError, match="another base model"):
        bank.load(key, "doc", "other-fp", SHAPES)
    with pytest.raises(AdapterError, match="wrong shapes"):
        bank.load(key, "doc", "fp", {**SHAPES, "up_proj": (99, 64)})
    w = bank.folder(key) / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    with pytest.raises(AdapterError, match="'doc' is corrupt"):
        bank.load(key, "doc", "fp", SHAPES)
    (bank.folder(key) / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing or unreadable"):
        bank.load(key, "doc", "fp", SHAPES)
    assert not list(tmp_path.glob(".*"))  # no temporary folders left behind


def test_models_without_gate_up_down_are_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="GPT2LMHeadModel has no gate_proj"):
        LoraTrainer(model, tiny_tokenizer(), get_recipe("paper"), "fp")


DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."},
        {"id": "paris", "title": "Paris", "text": "Paris is the capital and largest city of France."}]
ASK = [{"role": "user", "content": "Where does Zorbl live?"}]


def test_prag_through_the_api(make_server, monkeypatch):
    import threading

    import server.prag

    made_on = []

    base_weights = []

    class Trainer(server.prag.LoraTrainer):  # records where the trainer (a copy of the model) is made
        def __init__(self, model, *a, **kw):
            made_on.append(threading.current_thread().name)
            base_weights.extend(p.data_ptr() for p in model.parameters())
            super().__init__(model, *a, **kw)

    monkeypatch.setattr(server.prag, "LoraTrainer", Trainer)
    srv = make_server(adapter_recipe="paper-answer-loss")
    r = httpx.post(srv.url + "/v1/documents", json={"documents": DOCS[:1], "build": ["adapters"]}).json()
    job = wait_for_job(srv.url, r["job"], timeout=120)
    assert job["status"] == "done" and job["built"] == 1, job
    assert made_on == ["knowmux-engine"]  # torch work on the engine's thread, not the job's
    served = {p.data_ptr() for p in srv.runtime.engine.hf_model.parameters()}
    assert base_weights and set(base_weights) <= served  # the trainer's modules share the served weights
    info = httpx.get(srv.url + "/v1/adapters/zorbl").json()
    assert info["stored"] and "adapter_config.json" in info["files"] and len(info["augmentation"]["qa"]) == 3
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS[1:]})  # no adapter for this one
    c = srv.client()
    kw = dict(model="knowmux", messages=ASK, max_tokens=6, temperature=0, extra_body={"top_k": 2, "ignore_eos": True})
    prag = c.chat.completions.create(extra_headers={"X-Strategy": "prag"}, **kw)
    kx = prag.model_extra["knowmux"]
    assert kx["strategy"] == "prag" and kx["missing_adapters"] == ["paris"] and kx["adapters_applied"] == 1
    direct = c.chat.completions.create(extra_headers={"X-Strategy": "direct"}, **kw)
    assert prag.usage.prompt_tokens == direct.usage.prompt_tokens  # prag sends the question alone
    both = c.chat.completions.create(extra_headers={"X-Strategy": "prag+rag"}, **kw)
    assert both.usage.prompt_tokens > direct.usage.prompt_tokens
    e = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "prag"},
                   json={"model": "knowmux", "messages": ASK, "top_k": 2, "on_missing": "error"})
    assert e.status_code == 409 and "paris" in e.json()["error"]["message"]
    named = c.chat.completions.create(extra_headers={"X-Strategy": "prag"},
                                      **{**kw, "extra_body": {"adapters": [{"doc_id": "zorbl", "scale": 0.5}],
                                                              "ignore_eos": True}})
    assert named.model_extra["knowmux"]["retrieved"][0]["id"] == "zorbl"
    for bad, param in [([{"doc_id": 3}], "adapters[0]"), ([{"doc_id": "zorbl", "scale": "x"}], "adapters[0].scale")]:
        e = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "prag"},
                       json={"model": "knowmux", "messages": ASK, "adapters": bad})
        assert e.status_code == 400 and e.json()["error"]["param"] == param
    # a corrupted adapter is reported by document, never used
    folder = srv.runtime.artefacts.prag.bank.folder(info["key"])
    w = folder / "adapter_model.safetensors"
    w.write_bytes(w.read_bytes()[:-16] + b"\x00" * 16)
    srv.runtime.artefacts.prag._cache.clear()
    e = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "prag"},
                   json={"model": "knowmux", "messages": ASK, "top_k": 2, "on_missing": "error"})
    assert e.status_code == 409 and "zorbl failed its checks and was removed" in e.json()["error"]["message"]
    assert not folder.exists()  # removed, so the next build trains it afresh
    r = httpx.post(srv.url + "/v1/chat/completions", headers={"X-Strategy": "prag"},
                   json={"model": "knowmux", "messages": ASK, "top_k": 2, "max_tokens": 2})
    assert r.status_code == 200 and "zorbl" in r.json()["knowmux"]["missing_adapters"]


def test_replicas_share_adapters_through_a_tier(tmp_path):
    """An adapter saved by one replica is fetched, checked and kept by another that has
    no folder for it; a damaged object is refused; removing deletes it everywhere; an
    unreachable tier is a miss."""
    from server.tiers import DirectoryTier, open_tier
    from tests.conftest import UnreachableTier

    pm = random_peft_adapters(tiny_model(), ["doc1"])
    tier = open_tier((tmp_path / "shared").as_uri(), "adapters")
    a = AdapterBank(tmp_path / "a", tier)
    b = AdapterBank(tmp_path / "b", open_tier(str(tmp_path / "shared"), "adapters"))
    a.save("k1", peft_writer(pm, "doc1"), {"qa": []}, {"model": "fp"})
    assert sorted(p.name for p in (tmp_path / "shared" / "adapters").iterdir()) == \
        sorted(f"k1.{f}" for f in ("adapter_config.json", "adapter_model.safetensors", "augmentation.json",
                                   "knowmux.json"))
    assert b.has("k1") and (tmp_path / "b" / "k1" / "knowmux.json").is_file()  # fetched and kept
    wa, wb = (bank.load("k1", "doc1", "fp", SHAPES) for bank in (a, b))
    assert all(torch.equal(wa.deltas[k][0], wb.deltas[k][0]) for k in wa.deltas)

    c = AdapterBank(tmp_path / "c", DirectoryTier(tmp_path / "shared" / "adapters"))
    raw = bytearray(tier.get("k1.adapter_model.safetensors"))
    raw[-4:] = b"\x00" * 4
    tier.put("k1.adapter_model.safetensors", bytes(raw))
    assert not c.has("k1") and not (tmp_path / "c" / "k1").exists()  # damaged: refused, not kept
    with pytest.raises(AdapterError, match="missing"):
        c.load("k1", "doc1", "fp", SHAPES)

    assert a.remove("k1") and not tier.exists("k1.knowmux.json") and not b.remove("k2")

    d = AdapterBank(tmp_path / "d", UnreachableTier())
    assert not d.has("k1")
    d.save("k3", peft_writer(pm, "doc1"), {}, {"model": "fp"})  # stored locally; the tier's failure is logged
    assert d.has("k3")
