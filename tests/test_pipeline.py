"""The request path from HTTP to the engine on a fake engine and a fake knowledge base,
in-process through FastAPI's ``dependency_overrides``: no model, no server process.

What is checked here is the plumbing: which strategies a runtime offers given the
engine's capabilities, what the pipeline submits (rows, sampling, the logits hook, the
options as sent), and the composition of +ckplug over its base strategy."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.api.auth import Keys
from server.api.deps import get_runtime
from server.config import Settings
from server.engine import LOGITS_HOOK
from server.engine.types import TokenEvent
from server.jobs import JobManager
from server.metrics import Metrics
from server.runtime import Runtime, assemble
from tests.tiny import tiny_tokenizer

ASK = [{"role": "user", "content": "Where does Zorbl live?"}]


@dataclass
class _Hit:
    doc_id: str
    score: float


@dataclass
class _Doc:
    id: str
    text: str
    title: str = ""


class FakeKB:
    """Two documents; every search returns both, Zorbl's first."""

    docs = {"zorbl": _Doc("zorbl", "Zorbl is a purple cat who lives on the moon base Tycho.", "Zorbl"),
            "paris": _Doc("paris", "Paris is the capital of France.", "Paris")}

    def count(self) -> int:
        return len(self.docs)

    def search(self, query: str, k: int) -> list:
        return [_Hit("zorbl", 0.9), _Hit("paris", 0.2)][:k]

    def get_many(self, ids: list[str]) -> dict:
        return {i: self.docs[i] for i in ids if i in self.docs}


class FakeEngine:
    """Answers every request at once with the tokens of "ok" and remembers the request."""

    name = "fake"
    model_id = "fake-model"
    max_context = 2048

    def __init__(self, capabilities=frozenset(), generation_config=None):
        self.capabilities = frozenset(capabilities)
        self.tokenizer = tiny_tokenizer()
        self.generation_config = generation_config
        self.submitted = []

    def submit(self, req, sink):
        self.submitted.append(req)
        ids = self.tokenizer.encode("ok")
        sink(TokenEvent("ok", ids, finish_reason="stop", prompt_tokens=len(req.rows[0].prompt_ids),
                        completion_tokens=len(ids)))

        class Handle:
            def cancel(self):
                pass

        return Handle()

    def stats(self) -> dict:
        return {"queue": 0, "running": 0}

    def health(self):
        return True, "ok"

    alive = True

    def observe_steps(self, callback):
        pass

    def start(self):
        pass

    def shutdown(self):
        pass


def client_for(tmp_path, capabilities=frozenset(), generation_config=None, **settings
               ) -> tuple[TestClient, FakeEngine]:
    s = Settings.from_env(env={}, data_dir=tmp_path, **settings)
    engine, kb = FakeEngine(capabilities, generation_config), FakeKB()
    rt = Runtime(s, engine, kb, assemble(engine, kb, s, data_dir=None), Metrics(), Keys.from_settings(s),
                 JobManager(tmp_path / "jobs"))
    app = create_app(s)  # its lifespan (which would build a real runtime) is not entered
    app.dependency_overrides[get_runtime] = lambda: rt
    return TestClient(app), engine


def chat(client, **body):
    return client.post("/v1/chat/completions", json={"model": "knowmux", "messages": ASK, **body})


def test_the_strategies_offered_follow_the_engine_capabilities(tmp_path):
    plain, _ = client_for(tmp_path)
    assert plain.get("/v1/models").json()["data"][0]["strategies"] == ["auto", "direct", "rag"]
    r = chat(plain, strategy="rag+ckplug")
    assert r.status_code == 400 and r.json()["error"]["code"] == "strategy_not_supported"
    hooked, _ = client_for(tmp_path, {LOGITS_HOOK})
    assert hooked.get("/v1/models").json()["data"][0]["strategies"] == ["auto", "direct", "rag", "rag+ckplug"]


def test_rag_submits_one_row_with_the_passages_and_direct_without(tmp_path):
    client, engine = client_for(tmp_path)
    r = chat(client, strategy="rag", top_k=1, max_tokens=3)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "ok"
    assert [d["id"] for d in r.json()["knowmux"]["retrieved"]] == ["zorbl"]
    (rag,) = engine.submitted
    assert len(rag.rows) == 1 and "moon base Tycho" in engine.tokenizer.decode(rag.rows[0].prompt_ids)
    chat(client, strategy="direct")
    direct = engine.submitted[-1]
    assert "Tycho" not in engine.tokenizer.decode(direct.rows[0].prompt_ids)
    assert len(direct.rows[0].prompt_ids) < len(rag.rows[0].prompt_ids)


def test_sampling_reaches_the_engine_as_sent_and_max_tokens_fills_to_the_default(tmp_path):
    client, engine = client_for(tmp_path, default_max_tokens=50)
    chat(client, strategy="direct", temperature=0, seed=0, top_p=0.5, presence_penalty=0, stop="x", max_tokens=7)
    sp = engine.submitted[-1].sampling
    assert (sp.temperature, sp.seed, sp.top_p, sp.presence_penalty, sp.stop, sp.max_tokens) == \
        (0, 0, 0.5, 0, ("x",), 7)
    chat(client, strategy="direct")  # none given: the server's default, as the context allows
    assert engine.submitted[-1].sampling.max_tokens == 50


def test_n_choices_share_a_route_and_are_seeded_apart(tmp_path):
    client, engine = client_for(tmp_path)
    r = chat(client, strategy="rag", n=3, seed=0, temperature=0.5)
    assert r.status_code == 200 and len(r.json()["choices"]) == 3
    assert [q.sampling.seed for q in engine.submitted] == [0, 1, 2]
    assert len({tuple(q.rows[0].prompt_ids) for q in engine.submitted}) == 1


@pytest.mark.parametrize("alpha", [0, 0.5, 1, "adaptive"])
def test_ckplug_pairs_the_base_row_with_a_row_without_context(tmp_path, alpha):
    client, engine = client_for(tmp_path, {LOGITS_HOOK})
    r = chat(client, strategy="rag", top_k=1)
    rag = engine.submitted[-1]
    r = chat(client, strategy="rag+ckplug", top_k=1, ckplug_alpha=alpha)
    assert r.status_code == 200, r.text
    assert r.json()["knowmux"]["ckplug"]["alpha"] == alpha  # as sent (0 is 0, not "adaptive")
    pair = engine.submitted[-1]
    assert len(pair.rows) == 2 and pair.logits_hook is not None
    assert pair.rows[0].prompt_ids == rag.rows[0].prompt_ids  # the base strategy's row, unchanged
    assert "Tycho" not in engine.tokenizer.decode(pair.rows[1].prompt_ids)


def test_ckplug_composes_without_changing_its_base_strategy(tmp_path):
    from server.strategies import get_strategy
    from server.strategies.base import Query
    from server.engine.types import SamplingParams

    _, engine = client_for(tmp_path, {LOGITS_HOOK})
    parts = assemble(engine, FakeKB(), Settings(data_dir=tmp_path), data_dir=None)
    q = Query("r", ASK, ASK[-1]["content"], 1, SamplingParams(max_tokens=4), {"ckplug_alpha": 0})
    rag, paired = get_strategy("rag").plan(q, parts.ctx), get_strategy("rag+ckplug").plan(q, parts.ctx)
    assert (rag.strategy, len(rag.rows), rag.logits_hook, rag.report) == ("rag", 1, None, None)
    assert paired.strategy == "rag+ckplug" and paired.rows[0].prompt_ids == rag.rows[0].prompt_ids
    assert paired.report()["ckplug"]["alpha"] == 0.0
    assert get_strategy("kv+ckplug").requires == {"kv", LOGITS_HOOK}


def test_bad_values_are_400s_naming_the_field_before_the_engine(tmp_path):
    client, engine = client_for(tmp_path, {LOGITS_HOOK})
    for body, param in [({"ckplug_alpha": 2}, "ckplug_alpha"), ({"kv_recompute": -1}, "kv_recompute"),
                        ({"top_k": 0}, "top_k"), ({"top_k": 21}, "top_k"), ({"n": 9}, "n"),
                        ({"max_tokens": 0}, "max_tokens"), ({"strategy": "telepathy"}, "strategy")]:
        r = chat(client, **body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, (body, r.text)
    assert engine.submitted == []


def test_a_request_that_sets_no_sampling_gets_the_server_then_the_model_then_openai_default(tmp_path):
    from transformers import GenerationConfig

    model = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.9)

    def sent(client, engine, **body):
        assert chat(client, strategy="direct", **body).status_code == 200
        return engine.submitted[-1].sampling.temperature, engine.submitted[-1].sampling.top_p

    client, engine = client_for(tmp_path, generation_config=model)
    assert sent(client, engine) == (0.3, 0.9)  # the model folder's recommendation
    assert sent(client, engine, temperature=0, top_p=1) == (0, 1)  # a request's own values win, zeros too
    client, engine = client_for(tmp_path, generation_config=model, default_temperature=0.0)
    assert sent(client, engine) == (0.0, 0.9)  # --default-temperature over the model's, each on its own
    client, engine = client_for(tmp_path)
    assert sent(client, engine) == (1.0, 1.0)  # nothing anywhere: OpenAI's defaults


def test_the_model_folders_generation_config_is_read_by_the_engine(tmp_path):
    from transformers import GenerationConfig

    from server.engine.torch_engine import TorchEngine
    from server.runtime import sampling_defaults
    from tests.tiny import tiny_model_folder

    folder = tiny_model_folder(tmp_path / "model")
    GenerationConfig(do_sample=True, temperature=0.25, eos_token_id=2).save_pretrained(folder)
    engine = TorchEngine.from_folder(folder)
    try:
        assert sampling_defaults(engine, Settings()) == {"temperature": 0.25, "top_p": 1.0}
        assert sampling_defaults(engine, Settings(default_top_p=0.5)) == {"temperature": 0.25, "top_p": 0.5}
    finally:
        engine.shutdown()
    with pytest.raises(ValueError, match="DEFAULT_TEMPERATURE"):
        Settings(default_temperature=3.0)
