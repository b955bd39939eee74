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
