"""Schemas of usage reporting (`GET /v1/usage`) and key administration (`/v1/admin/keys`)."""

from __future__ import annotations

from datetime import datetime

from pydantic import Field

from lmaas_protocol.base import WireModel


class LedgerRecord(WireModel):
    request_id: str
    endpoint: str
    calls: int
    tokens: int
    status: str = Field(description="reserved (in flight), settled (charged) or refunded (not charged).")
    http_status: int | None = None
    latency_ms: float | None = None
    created_at: datetime


class UsageResponse(WireModel):
    key_prefix: str
    name: str
    budget: int = Field(description="Calls this key may spend in all.")
    used: int = Field(description="Calls charged or reserved by requests in flight.")
    remaining: int
    token_budget: int | None = None
    tokens_used: int
    tokens_remaining: int | None = None
    rate_limit: float | None = Field(None, description="Requests per second, if limited.")
    expires_at: datetime | None = None
    recent: list[LedgerRecord] = Field(default_factory=list, description="The newest requests first.")


class KeyCreateRequest(WireModel):
    budget: int = Field(ge=0, le=10**15, description="Calls.")
    name: str = Field("", max_length=200)
    token_budget: int | None = Field(None, ge=0, le=10**18)
    rate_limit: float | None = Field(None, gt=0, le=1e6, description="Requests per second.")
    expires_at: datetime | None = None


class KeyDescription(WireModel):
    prefix: str = Field(description="The key's public prefix; the secret is shown only once, at creation.")
    name: str
    budget: int
    used: int
    token_budget: int | None = None
    tokens_used: int
    rate_limit: float | None = None
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    created_at: datetime


class KeyCreated(KeyDescription):
    key: str = Field(description="The secret key. Store it now: the server keeps only its hash.")


class TopUpRequest(WireModel):
    calls: int = Field(0, ge=0, le=10**15)
    tokens: int = Field(0, ge=0, le=10**18)
