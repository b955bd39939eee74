"""The compute thread: the one thread of a serving process that runs torch's kernels.

Torch's OpenMP runtime (libgomp) keeps a team of worker threads for every thread that has
run a parallel region. Once a process holds more of those threads than it has cores, the
workers stop spinning between parallel regions and sleep, so each of the few hundred
regions of a forward pass pays a wake-up. Measured on 2 cores (SmolLM2-135M, a bare
forward of 8 decode rows): 31.5 ms per step on the thread that loaded the model, 45-52 ms
on a second thread once the first had run parallel work, 31.7 ms when one thread (not the
main one) does both.

So a TorchEngine loads, tunes and steps its model on one ComputeThread, and the other
torch work of a serving process (query embeddings, joining stored KV caches) is handed to
it through ``TorchEngine.run_compute`` instead of running on the event loop's or a worker
pool's threads.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

T = TypeVar("T")


class ComputeThread:
    """A thread that runs submitted callables one after another, until ``close``. The
    engine's step loop is itself one long job on it; while that loop runs, work reaches
    the thread through the engine worker's ``call`` instead (TorchEngine.run_compute
    picks the way)."""

    def __init__(self, name: str = "knowmux-engine"):
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._main, name=name, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, fut = job
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller; the thread lives on
                fut.set_exception(exc)

    def is_current(self) -> bool:
        return threading.current_thread() is self.thread

    def submit(self, fn: Callable[[], T]) -> "Future[T]":
        fut: Future = Future()
        self._jobs.put((fn, fut))
        return fut

    def run(self, fn: Callable[[], T]) -> T:
        """``fn()`` on this thread (at once when called from it), its result or exception."""
        return fn() if self.is_current() else self.submit(fn).result()

    def close(self, wait: float = 0.0) -> None:
        """Stop after the jobs already submitted, waiting up to ``wait`` seconds for that."""
        self._jobs.put(None)
        if wait and not self.is_current():
            self.thread.join(wait)
