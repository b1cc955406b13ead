"""Dependency aliases: routes reach the engine, the meter, the caller's key and account only through these."""

from __future__ import annotations

import hashlib
import secrets
import threading
from typing import Annotated

from fastapi import Depends, Header, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from lmaas_protocol import IDEMPOTENCY_HEADER, ErrorCode
from lmaas_server.config import Settings
from lmaas_server.engine import Engine
from lmaas_server.errors import APIError, ModelNotReady
from lmaas_server.metering.accounts import Account, KeyAccount, Replayed
from lmaas_server.metering.budget import CallBudget
from lmaas_server.metering.meter import Key, Meter
from lmaas_server.metering.prompt_store import PromptStore

bearer = HTTPBearer(auto_error=False, description="An API key (`lmaas-server keys create`).")
admin_bearer = HTTPBearer(auto_error=False, scheme_name="AdminToken", description="The server's admin token.")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_engine(request: Request) -> Engine:
    engine = getattr(request.app.state, "engine", None)
    if engine is None:
        raise ModelNotReady()
    return engine


def get_meter(request: Request) -> Meter:
    meter = getattr(request.app.state, "meter", None)
    if meter is None:
        raise APIError(ErrorCode.NOT_FOUND, "this server runs without API keys (no metering database)")
    return meter


_in_memory_lock = threading.Lock()


def get_prompts(request: Request) -> PromptStore:
    """The deployed prompts: the metering database's, or, on a server without keys, an in-memory store made at
    first use (shared by every caller, lost at exit)."""
    state = request.app.state
    if state.meter is not None:
        return state.meter.prompts
    with _in_memory_lock:
        if getattr(state, "prompts", None) is None:
            state.prompts = PromptStore.in_memory(state.settings.max_prompts_per_key)
        return state.prompts


def owner_id(key: Key | None) -> int | None:
    """Deployed prompts belong to the key that deployed them (shared on a server without keys)."""
    return key.id if key is not None else None


def get_key(request: Request, credentials: Credentials) -> Key | None:
    """The caller's key (checked: known, not revoked or expired, within its rate limit); None without keys."""
    if not request.app.state.settings.require_api_key:
        return None
    return get_meter(request).authenticate(credentials.credentials if credentials else None)


async def get_body_hash(request: Request) -> str:
    """SHA-256 of the raw body (read once; the route parses the same cached bytes)."""
    return hashlib.sha256(await request.body()).hexdigest()


def get_account(
    request: Request,
    key: Annotated[Key | None, Depends(get_key)],
    body_hash: Annotated[str, Depends(get_body_hash)],
    idempotency_key: Annotated[
        str | None,
        Header(alias=IDEMPOTENCY_HEADER, max_length=128, description="Retries with the same key are charged once."),
    ] = None,
) -> KeyAccount | CallBudget:
    if key is None:
        return request.app.state.budget
    route = request.scope.get("route")
    endpoint = getattr(route, "path", request.url.path)
    return KeyAccount(get_meter(request), key, endpoint, request.state.request_id, idempotency_key, body_hash)


def replay_first(account: Annotated[Account, Depends(get_account)]) -> Account:
    """The caller's account, after answering a settled Idempotency-Key retry with its stored response.

    The charge context replays too (on entry); asking first, before the body is parsed or checked, means a
    replay never depends on the server's state now (a handle lost in a restart, a model reloaded)."""
    stored = account.replay()
    if stored is not None:
        raise Replayed(stored.body, stored.status)
    return account


def require_admin(
    request: Request, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(admin_bearer)]
) -> None:
    token = request.app.state.settings.admin_token
    if token is None:
        raise APIError(ErrorCode.UNAUTHORIZED, "the admin API is disabled: set LMAAS_ADMIN_TOKEN to enable it",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
    given = credentials.credentials if credentials else ""
    if not secrets.compare_digest(given.encode(), token.get_secret_value().encode()):
        raise APIError(ErrorCode.UNAUTHORIZED, "admin token required", headers={"WWW-Authenticate": "Bearer"})


def get_request_id(request: Request) -> str:
    return request.state.request_id


SettingsDep = Annotated[Settings, Depends(get_settings)]
EngineDep = Annotated[Engine, Depends(get_engine)]
MeterDep = Annotated[Meter, Depends(get_meter)]
KeyDep = Annotated[Key | None, Depends(get_key)]
AccountDep = Annotated[Account, Depends(replay_first)]  # charged routes: replays answered first
AdminDep = Depends(require_admin)
RequestIdDep = Annotated[str, Depends(get_request_id)]
PromptsDep = Annotated[PromptStore, Depends(get_prompts)]
