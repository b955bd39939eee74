"""Bridging the engine thread to asyncio and to plain threads. No torch here."""

from __future__ import annotations

import asyncio
import queue
from typing import Optional

from .types import GenRequest, TokenEvent


class EventStream:
    """Submits on construction (so QueueFull and friends raise before any output), then
    yields the request's TokenEvents. ``cancel()`` (or an early ``aclose()``) frees the
    request's place in the batch at the next step."""

    def __init__(self, engine, req: GenRequest):
        loop = asyncio.get_running_loop()
        self._events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self._done = False
        self._handle = engine.submit(req, lambda ev: loop.call_soon_threadsafe(self._events.put_nowait, ev))

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> TokenEvent:
        if self._done:
            raise StopAsyncIteration
        ev = await self._events.get()
        if ev.finish_reason is not None:
            self._done = True
        return ev

    def cancel(self) -> None:
        self._handle.cancel()

    async def aclose(self) -> None:
        self.cancel()


def generate_blocking(engine, req: GenRequest, timeout: Optional[float] = None) -> tuple[str, str]:
    """Run one request to the end from a plain thread: (text, finish_reason).

    This is the ``generate`` function handed to adapters/ for augmentation."""
    events: queue.Queue[TokenEvent] = queue.Queue()
    handle = engine.submit(req, events.put)
    parts = []
    try:
        while True:
            ev = events.get(timeout=timeout)
            parts.append(ev.text)
            if ev.finish_reason is not None:
                if ev.finish_reason == "error":
                    raise RuntimeError(ev.error or "engine error")
                return "".join(parts), ev.finish_reason
    finally:
        handle.cancel()
