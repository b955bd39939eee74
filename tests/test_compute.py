"""One thread runs the serving process's torch kernels (server.engine.compute)."""

from __future__ import annotations

import os
import threading

import pytest
import torch

from server.engine.compute import ComputeThread
from server.engine.torch_engine import TorchEngine
from tests.tiny import tiny_model_folder


def test_compute_thread_runs_jobs_in_order_and_hands_back_results_and_errors():
    c = ComputeThread(name="test-compute")
    try:
        assert c.run(threading.current_thread) is c.thread
        assert [c.submit(lambda i=i: i * i).result() for i in range(5)] == [0, 1, 4, 9, 16]
        with pytest.raises(ZeroDivisionError):
            c.run(lambda: 1 / 0)
        assert c.run(lambda: c.run(lambda: "nested")) == "nested"  # from the thread itself: inline
    finally:
        c.close()
    c.thread.join(timeout=5)
    assert not c.thread.is_alive()


@pytest.fixture
def folder_engine(tmp_path):
    eng = TorchEngine.from_folder(tiny_model_folder(tmp_path), threads=2)
    yield eng
    eng.shutdown()


def test_engine_builds_and_steps_its_model_and_runs_other_work_on_one_thread(folder_engine):
    eng = folder_engine
    assert eng.run_compute(threading.current_thread) is eng.compute.thread  # before start
    eng.start()
    assert eng.worker.on_engine_thread() is False
    assert eng.run_compute(threading.current_thread) is eng.compute.thread  # between steps
    seen = []
    eng.run_compute(lambda: seen.append(eng.run_compute(threading.current_thread)))  # from the thread: inline
    assert seen == [eng.compute.thread]
    # shutdown waits for the thread: a process that exits right after must not tear down a
    # thread still running torch code ("terminate called without an active exception")
    eng.shutdown()
    assert not eng.compute.thread.is_alive()


PROBE = b"kmx-omp-probe"


def _name_this_thread() -> None:
    """Name the OS thread; threads it creates (OpenMP's workers) inherit the name."""
    import ctypes

    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(PROBE), 0, 0, 0)  # PR_SET_NAME


def _probe_threads() -> int:
    """OS threads named PROBE: the probes themselves and the workers they created."""
    n = 0
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm", "rb") as f:
                n += f.read().strip() == PROBE
        except OSError:  # the thread ended meanwhile
            pass
    return n


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or torch.get_num_threads() < 2,
                    reason="counts OpenMP worker threads through /proc with 2+ torch threads")
def test_torch_work_from_other_threads_adds_no_openmp_team(folder_engine):
    """Every thread that runs a parallel region gets its own OpenMP worker threads; more of
    them than cores slows every forward pass (server.engine.compute). Work handed to
    run_compute from other threads must not create any."""
    eng = folder_engine
    eng.start()

    def parallel_work():
        return torch.ones(1 << 22).add_(1).sum().item()

    eng.run_compute(parallel_work)  # the engine thread's own team exists from here on

    def from_threads(direct: bool) -> int:
        hold, ready = threading.Event(), threading.Barrier(4)

        def body():
            _name_this_thread()
            parallel_work() if direct else eng.run_compute(parallel_work)
            ready.wait()
            hold.wait()  # alive while counted: a thread's team ends with it

        threads = [threading.Thread(target=body) for _ in range(3)]
        for t in threads:
            t.start()
        ready.wait()
        grown = _probe_threads() - len(threads)
        hold.set()
        for t in threads:
            t.join()
        return grown

    assert from_threads(direct=False) == 0
    assert from_threads(direct=True) >= 3  # the control: run directly, each thread grows a team


def test_embeddings_and_faiss_searches_run_where_the_embedder_runs(tmp_path, folder_engine):
    """A serving process's embedder runs on the engine's thread; FAISS parallelises with
    torch's OpenMP runtime, so the knowledge base searches there too."""
    import numpy as np

    from indexes import KnowledgeBase
    from indexes.store import Document

    eng = folder_engine
    eng.start()
    where = []

    class Embedder:  # a stand-in with the real one's interface: 8 dimensions, one per letter
        dim, name = 8, "letters"

        def run(self, fn):
            return eng.run_compute(lambda: (where.append(threading.current_thread()), fn())[1])

        def encode(self, texts):
            out = np.zeros((len(texts), 8), dtype=np.float32)
            for i, t in enumerate(texts):
                out[i, ord(t.strip()[0]) % 8] = 1.0
            return self.run(lambda: out)

    kb = KnowledgeBase(tmp_path / "kb", Embedder())
    try:
        kb.upsert([Document("a", "alpha"), Document("b", "beta")])
        where.clear()
        hits = kb.search("beta", 1)
    finally:
        kb.close()
    assert [h.doc_id for h in hits] == ["b"]
    assert where == [eng.compute.thread] * 2  # the query's embedding, then the FAISS search
