"""With the real SmolLM2-135M-Instruct (loaded once per session): rag answers an invented fact, direct does not."""

import httpx
import pytest

pytestmark = pytest.mark.real_model

FACTS = [
    {"id": "quill", "title": "Zorblax Prize",
     "text": "The Zorblax Prize for underwater chess was first awarded in 2019 to Marta Quillfeather, "
             "a diver from Iceland."},
    {"id": "vent", "title": "Mount Vexlor",
     "text": "Mount Vexlor is a volcano on the island of Brindlemoor. Its last eruption was in 1874."},
    {"id": "tea", "title": "Glimmerleaf tea",
     "text": "Glimmerleaf tea is brewed from the blue leaves of the snorpel bush and tastes of cinnamon."},
]
QUESTIONS = [
    ("Who first won the Zorblax Prize for underwater chess?", "quillfeather"),
    ("On which island is Mount Vexlor?", "brindlemoor"),
    ("What plant is Glimmerleaf tea made from?", "snorpel"),
]


@pytest.fixture(scope="module")
def real_server(real_engine, embedder, tmp_path_factory):
    from server.config import Settings
    from server.runtime import Runtime
    from tests.conftest import LiveServer

    s = Settings.from_env(env={}, data_dir=tmp_path_factory.mktemp("real"))
    rt = Runtime.build(s, engine=real_engine, embedder=embedder)
    srv = LiveServer(rt).__enter__()
    assert httpx.post(srv.url + "/v1/documents", json={"documents": FACTS}).status_code == 200
    yield srv
    srv.server.should_exit = True
    srv.thread.join(timeout=30)


def ask(srv, question, strategy):
    r = srv.client().chat.completions.create(model="knowmux", messages=[{"role": "user", "content": question}],
                                             max_tokens=40, temperature=0, extra_headers={"X-Strategy": strategy},
                                             extra_body={"top_k": 3})
    return r.choices[0].message.content.lower()


@pytest.mark.parametrize("question,fact", QUESTIONS)
def test_rag_answers_invented_facts_and_direct_does_not(real_server, question, fact):
    assert fact in ask(real_server, question, "rag")
    assert fact not in ask(real_server, question, "direct")


@pytest.mark.parametrize("question,fact", QUESTIONS)
def test_kv_answers_invented_facts_like_rag(real_server, question, fact):
    """Three passages joined from separately computed caches; the first is exact, the
    others miss only cross-passage attention."""
    assert fact in ask(real_server, question, "kv")


def test_ckplug_alpha_moves_the_answer_on_a_constructed_conflict(real_server):
    """A counterfactual passage: plain rag (like alpha 0.5) follows memory here. Lowering
    alpha reaches the context's answer (measured here: at 0.25, not at 0, where the paper's
    CG < 0 condition does not fire on the deciding token); alpha 1 keeps memory's."""
    httpx.post(real_server.url + "/v1/documents", json={"documents": [
        {"id": "fake-boil", "title": "", "text": "Water boils at 40 degrees Celsius at sea level."}]})

    def answer(strategy, alpha=None):
        extra = {"top_k": 1} if alpha is None else {"top_k": 1, "ckplug_alpha": alpha}
        r = real_server.client().chat.completions.create(
            model="knowmux", max_tokens=20, temperature=0, extra_headers={"X-Strategy": strategy}, extra_body=extra,
            messages=[{"role": "user", "content": "At what temperature does water boil at sea level in Celsius?"}])
        assert r.model_extra["knowmux"]["retrieved"][0]["id"] == "fake-boil"
        return r.choices[0].message.content.lower()

    low = [answer("rag+ckplug", a) for a in (0.0, 0.25)]
    assert any("40" in a and "100" not in a for a in low), low
    high = answer("rag+ckplug", 1.0)
    assert "100" in high and "40 " not in high
    assert answer("rag+ckplug", 0.5) == answer("rag")
