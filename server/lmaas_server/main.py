"""The FastAPI application: settings in, model and metering set up in the lifespan, routes, middleware."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from lmaas_protocol import __version__
from lmaas_server.api import admin, handlers, prompts
from lmaas_server.api.middleware import BodyLimitMiddleware, InternalErrorMiddleware, RequestContextMiddleware
from lmaas_server.api.routes import router, service_router
from lmaas_server.api.schema import openapi
from lmaas_server.config import Settings
from lmaas_server.engine import Engine
from lmaas_server.metering.budget import CallBudget
from lmaas_server.metering.meter import Meter, build_meter
from lmaas_server.metrics import MetricsMiddleware
from lmaas_server.model_loading import load_model

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None, engine: Engine | None = None, meter: Meter | None = None) -> FastAPI:
    """Build the app. Pass `engine` (and `meter`) to serve already built ones (tests); else the lifespan does."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owns_meter = settings.require_api_key and app.state.meter is None
        if owns_meter:
            app.state.meter = build_meter(settings)
        if app.state.meter is not None:
            app.state.meter.start_sweeper()  # refunds this replica's leftovers from before a crash
        owns_engine = app.state.engine is None
        if owns_engine:
            app.state.engine = Engine(load_model(settings), settings)
            log.info("serving %s", app.state.engine.info.name)
        yield
        if owns_engine:
            app.state.engine.close()
        if app.state.meter is not None:
            app.state.meter.close()

    app = FastAPI(
        title="lmaas",
        version=__version__,
        summary="Language-Model-as-a-Service: forward-only scoring of prompts for black-box tuning",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.meter = meter
    app.state.prompts = None  # a server without keys keeps deployed prompts in memory (api/deps.get_prompts)
    app.state.budget = CallBudget(settings.budget)  # the account of a server without keys
    app.include_router(router)
    app.include_router(prompts.router)
    app.include_router(admin.router)
    app.include_router(service_router)
    app.openapi = lambda: openapi(app, settings)
    handlers.install(app)
    app.add_middleware(InternalErrorMiddleware)  # innermost: 500s without dropping the connection
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(MetricsMiddleware)
    app.add_middleware(RequestContextMiddleware)  # outermost: ids also on 413 rejections
    return app
