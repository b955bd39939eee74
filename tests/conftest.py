import os
import socket
import threading
import time

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def embedder():
    from indexes.embedder import Embedder

    return Embedder()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class UnreachableTier:
    """A shared tier (server.tiers) whose every call fails, as one behind a dead network."""

    url = "s3://down"

    def __getattr__(self, name):
        def fail(*args):
            raise ConnectionError("no route to host")
        return fail


def start_tiny_server(data_dir, log, **env):
    """``python -m tests.serve_tiny`` in its own process (for kill -9 tests), environment
    ``env`` added; (the process, its URL) once /health answers."""
    import subprocess
    import sys
    from pathlib import Path

    import httpx

    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.serve_tiny", str(data_dir), str(port)],
                            cwd=Path(__file__).resolve().parents[1], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise AssertionError("server did not start")


def wait_for_job(url: str, job, timeout: float, poll: float = 0.2) -> dict:
    """A build job's state once it is no longer queued or running (or at the deadline):
    ``job`` is the job as an endpoint returned it, or its id."""
    import httpx

    state = job if isinstance(job, dict) else {"id": job, "status": "queued"}
    deadline = time.time() + timeout
    while state["status"] in ("queued", "running") and time.time() < deadline:
        time.sleep(poll)
        state = httpx.get(f"{url}/v1/jobs/{state['id']}").json()
    return state


class LiveServer:
    """uvicorn on loopback in a thread, serving an app around a given runtime."""

    def __init__(self, runtime, owns_engine: bool = True):
        import uvicorn

        from server.api.app import create_app

        self.runtime = runtime
        self.owns_engine = owns_engine  # False: a session fixture's engine outlives this server
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(runtime=runtime), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.runtime.jobs.shutdown()
        if self.owns_engine:
            self.runtime.engine.shutdown()
        self.runtime.kb.close()

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, **kw)


@pytest.fixture
def make_server(tmp_path, embedder):
    """make_server(limits=None, **settings) -> a started LiveServer on a tiny model and a fresh data dir."""
    from server.config import Settings
    from server.runtime import Runtime
    from tests.tiny import tiny_engine

    servers = []

    def make(limits=None, engine=None, **settings):
        s = Settings.from_env(env={}, data_dir=tmp_path / f"data{len(servers)}", **settings)
        rt = Runtime.build(s, engine=engine or tiny_engine(limits), embedder=embedder)
        srv = LiveServer(rt).__enter__()
        servers.append(srv)
        return srv

    yield make
    for srv in servers:
        srv.__exit__(None, None, None)


@pytest.fixture(scope="session")
def real_engine():
    """The real SmolLM2-135M-Instruct, converted once and cached, loaded once per session."""
    from server.engine.torch_engine import TorchEngine
    from server.modelfiles import ensure_default_model

    eng = TorchEngine.from_folder(ensure_default_model())
    eng.start()
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A PostgreSQL server for the session (bench.postgres); ``postgres.fresh_database(name)``."""
    from bench.postgres import Postgres

    pg = Postgres(tmp_path_factory.mktemp("postgres"), _free_port()).start()
    pg.wait()
    yield pg
    pg.stop()
