"""The FastAPI app factory. The lifespan builds the runtime (engine, knowledge base,
services, pipeline, metrics) unless one is passed in, as tests do with a tiny model."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI

from ..config import Settings
from . import errors
from .admin import router as admin_router
from .chat import router as chat_router
from .limits import BodySizeLimit
from .routing import router as routing_router

log = logging.getLogger(__name__)


async def _exit_when_engine_dies(app, rt, every_s: float = 2.0) -> None:
    """A dead engine thread cannot be trusted to restart in place: after a grace period
    of 503s (so in-flight clients get a clear answer) the server shuts down cleanly and
    exits non-zero, for a supervisor (systemd, Docker, Kubernetes) to restart it."""
    while True:
        await asyncio.sleep(every_s)
        if not rt.engine.alive:
            log.critical("the %s engine is dead (%s); shutting down so a supervisor can restart the server",
                         rt.engine.name, rt.engine.health()[1])
            app.state.engine_died = True  # `knowmux serve` exits with status 1
            await asyncio.sleep(every_s)
            request_exit = getattr(app.state, "request_exit", None)
            if request_exit is not None:  # set by `knowmux serve`: uvicorn's own graceful shutdown
                request_exit()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
            return


def create_app(settings: Optional[Settings] = None, runtime=None, exit_on_engine_death: Optional[bool] = None
               ) -> FastAPI:
    settings = settings or (runtime.settings if runtime is not None else Settings.from_env())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        rt = runtime
        owned = rt is None
        if owned:
            from ..runtime import Runtime  # heavy imports (torch) stay out of the HTTP module

            rt = Runtime.build(settings)
        rt.start()
        app.state.runtime = rt
        watch = owned if exit_on_engine_death is None else exit_on_engine_death
        watchdog = asyncio.create_task(_exit_when_engine_dies(app, rt)) if watch else None
        try:
            yield
        finally:
            if watchdog is not None:
                watchdog.cancel()
            if owned:
                rt.shutdown()

    app = FastAPI(title="knowmux", version="0.1.0", lifespan=lifespan)
    app.state.engine_died = False
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    errors.install(app)
    app.include_router(chat_router)
    app.include_router(admin_router)
    app.include_router(routing_router)
    return app
