"""The one thread that owns an engine (the torch worker's or the vLLM engine's loop)."""

from __future__ import annotations

import threading
from concurrent import futures
from concurrent.futures import Future
from typing import Optional

from .compute import ComputeThread


class LoopThread:
    """The one thread that owns an engine: start, stop, and whether it still runs.
    Subclasses provide ``_loop`` and set ``_cv`` (a Condition), ``_stop`` and ``_thread``."""

    thread_name = "knowmux-engine"
    _loop_job: Optional[Future] = None

    def start(self, on: Optional[ComputeThread] = None) -> None:
        """Run the loop on a thread of its own, or as a job of ``on`` (the thread that
        loaded the model: see server.engine.compute). Once: a second start (a second
        runtime around the same engine) must not add a second loop stepping it."""
        if self._thread is not None:
            return
        if on is None:
            self._thread = threading.Thread(target=self._loop, name=self.thread_name, daemon=True)
            self._thread.start()
        else:
            self._thread = on.thread
            self._loop_job = on.submit(self._loop)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._loop_job is not None:
            futures.wait([self._loop_job], timeout=30)
        elif self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def started(self) -> bool:
        return self._thread is not None

    def on_engine_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    @property
    def alive(self) -> bool:
        """False once the engine thread has stopped or died (never started counts as alive:
        tests step a worker by hand)."""
        if self._stop or (self._loop_job is not None and self._loop_job.done()):
            return False
        return self._thread is None or self._thread.is_alive()
