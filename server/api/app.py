"""The FastAPI app factory. The lifespan builds the runtime (engine, knowledge base,
pipeline, metrics) unless one is passed in, as tests do with a tiny model."""

from __future__ import annotations

import logging
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


def create_app(settings: Optional[Settings] = None, runtime=None) -> FastAPI:
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
        try:
            yield
        finally:
            if owned:
                rt.shutdown()

    app = FastAPI(title="knowmux", version="0.1.0", lifespan=lifespan)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    errors.install(app)
    app.include_router(chat_router)
    app.include_router(admin_router)
    app.include_router(routing_router)
    return app
