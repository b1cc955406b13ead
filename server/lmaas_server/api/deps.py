"""Dependency aliases: routes reach the engine, the budget and the settings only through these."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from lmaas_server.budget import CallBudget
from lmaas_server.config import Settings
from lmaas_server.engine import Engine
from lmaas_server.errors import ModelNotReady


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ModelNotReady()
    return engine


def get_budget(request: Request) -> CallBudget:
    return request.app.state.budget


def get_request_id(request: Request) -> str:
    return request.state.request_id


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
BudgetDep = Annotated[CallBudget, Depends(get_budget)]
RequestIdDep = Annotated[str, Depends(get_request_id)]
