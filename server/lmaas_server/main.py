"""The FastAPI application: settings in, model loaded in the lifespan, routes, handlers, middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lmaas_protocol import __version__
from lmaas_server.api import handlers
from lmaas_server.api.routes import router
from lmaas_server.budget import CallBudget
from lmaas_server.config import Settings
from lmaas_server.engine import Engine
from lmaas_server.middleware import BodyLimitMiddleware, RequestContextMiddleware
from lmaas_server.model_loading import load_model

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None) -> FastAPI:
    """Build the app. Pass `engine` to serve an already loaded model (tests); else the lifespan loads one."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.engine is None:
            app.state.engine = Engine(load_model(settings), settings)
            log.info("serving %s", app.state.engine.info.name)
        yield

    app = FastAPI(
        title="lmaas",
        version=__version__,
        summary="Language-Model-as-a-Service: forward-only scoring of prompts for black-box tuning",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.budget = CallBudget(settings.budget)
    app.include_router(router)
    handlers.install(app)
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestContextMiddleware)  # outermost: ids also on 413 rejections
    return app
