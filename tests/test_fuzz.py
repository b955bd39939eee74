"""Schemathesis against the server's own OpenAPI spec, on a tiny model with max_tokens
capped: every generated request (valid ones for every operation, schema-violating ones
for every JSON body) must get a non-5xx answer, every 4xx the OpenAI error shape, and
the engine must stay healthy. KNOWMUX_FUZZ_EXAMPLES sets the cases per operation and
mode (25 in the suite); KNOWMUX_FUZZ_MODEL=real runs it against SmolLM2 instead
(`make fuzz` does both with 300 cases)."""

import json
import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

EXAMPLES = int(os.environ.get("KNOWMUX_FUZZ_EXAMPLES", "25"))
SEEN: Counter = Counter()  # responses by status class, over the whole module (printed, and saved with
# KNOWMUX_FUZZ_REPORT=path)
DOCS = [{"id": "zorbl", "title": "Zorbl", "text": "Zorbl is a purple cat who lives on the moon base Tycho."}]


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory, embedder):
    import httpx

    from server.config import Settings
    from server.runtime import Runtime
    from tests.conftest import LiveServer
    from tests.tiny import tiny_engine

    s = Settings.from_env(env={}, data_dir=tmp_path_factory.mktemp("fuzz"), default_max_tokens=4,
                          max_tokens_limit=8, max_documents_per_call=20, max_document_chars=2000)
    if os.environ.get("KNOWMUX_FUZZ_MODEL") == "real":
        from server.engine.torch_engine import TorchEngine
        from server.modelfiles import ensure_default_model

        engine = TorchEngine.from_folder(ensure_default_model())
    else:
        engine = tiny_engine()
    srv = LiveServer(Runtime.build(s, engine=engine, embedder=embedder)).__enter__()
    httpx.post(srv.url + "/v1/documents", json={"documents": DOCS}).raise_for_status()
    yield srv
    srv.__exit__(None, None, None)
    summary = {"model": os.environ.get("KNOWMUX_FUZZ_MODEL", "tiny"), "examples_per_case": EXAMPLES,
               "requests": sum(SEEN.values()), "by_status": dict(sorted(SEEN.items()))}
    print(f"\nfuzz summary: {summary}")
    if os.environ.get("KNOWMUX_FUZZ_REPORT"):
        with open(os.environ["KNOWMUX_FUZZ_REPORT"], "w") as f:
            json.dump(summary, f, indent=1)


def _schema():
    from server.api.app import create_app
    from server.config import Settings

    return schemathesis.openapi.from_dict(create_app(Settings()).openapi())  # the app's own spec, no model needed


SCHEMA = _schema()
OPERATIONS = [r.ok() for r in SCHEMA.get_all_operations()]
# every operation with valid inputs; those with a JSON body also with invalid ones
CASES = [pytest.param(op, GenerationMode.POSITIVE, id=f"{op.label} valid") for op in OPERATIONS] + [
    pytest.param(op, GenerationMode.NEGATIVE, id=f"{op.label} invalid") for op in OPERATIONS
    if list(op.body)]  # path parameters are free strings: nothing to make invalid


@pytest.mark.parametrize("op, mode", CASES)
def test_no_5xx_and_openai_shaped_errors(op, mode, fuzz_server):
    @given(case=op.as_strategy(generation_mode=mode))
    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def fuzz(case):
        if case.path == "/v1/builds" and isinstance(case.body, dict) and case.body.get("kind") == "adapters":
            case.body["kind"] = "kv"  # adapter training takes seconds per document; its input checks are shared
        response = case.call(base_url=fuzz_server.url, timeout=60)
        SEEN[str(response.status_code)] += 1
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:500])
        if 400 <= response.status_code < 500 and response.status_code != 405:
            err = response.json().get("error")
            assert isinstance(err, dict) and isinstance(err.get("message"), str) and err["message"], response.text
            assert {"type", "param", "code"} <= set(err), response.text

    fuzz()
    assert fuzz_server.runtime.engine.health()[0]
