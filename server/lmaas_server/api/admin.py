"""`/v1/admin`: API keys for the model owner (Bearer admin token from LMAAS_ADMIN_TOKEN)."""

from __future__ import annotations

from fastapi import APIRouter

from lmaas_protocol import ErrorResponse, KeyCreated, KeyCreateRequest, KeyDescription, TopUpRequest
from lmaas_server.api.deps import AdminDep, MeterDep

router = APIRouter(
    prefix="/v1/admin", tags=["admin"], dependencies=[AdminDep],
    responses={status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 422, 500)},
)  # fmt: skip


@router.post("/keys", status_code=201, summary="Create a key; the secret is in this response only")
def create_key(body: KeyCreateRequest, meter: MeterDep) -> KeyCreated:
    secret, described = meter.create_key(body.budget, body.name, body.token_budget, body.rate_limit, body.expires_at)
    return KeyCreated(**described.model_dump(), key=secret)


@router.get("/keys", summary="All keys (prefixes, budgets, usage; never the secrets)")
def list_keys(meter: MeterDep) -> list[KeyDescription]:
    return meter.list_keys()


@router.post("/keys/{prefix}/topup", summary="Add calls (and tokens) to a key's budget")
def top_up(prefix: str, body: TopUpRequest, meter: MeterDep) -> KeyDescription:
    return meter.top_up(prefix, body.calls, body.tokens)


@router.post("/keys/{prefix}/revoke", summary="Revoke a key (its requests get 403 from now on)")
def revoke(prefix: str, meter: MeterDep) -> KeyDescription:
    return meter.revoke(prefix)
