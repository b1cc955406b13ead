"""API keys: creation, listing, top-ups, revocation (the admin side) and authentication (every request)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from lmaas_protocol import ErrorCode, KeyDescription
from lmaas_server.errors import APIError, InvalidRequest
from lmaas_server.metering.models import ApiKey
from lmaas_server.metering.rate_limits import RateLimiter

KEY_PREFIX = "lmaas_"
MAX_COUNTER = 2**63 - 1  # BIGINT: budgets and counters beyond it would fail in the database (500)


def hash_key(secret: str) -> str:
    """Keys are 256-bit random secrets, so a plain SHA-256 is the right one-way hash (no key stretching)."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """(secret, public prefix): `lmaas_<8 chars>_<43 chars>`; only the prefix is ever shown again."""
    public = KEY_PREFIX + secrets.token_urlsafe(6)
    return f"{public}_{secrets.token_urlsafe(32)}", public


def now() -> datetime:
    return datetime.now(UTC)


def aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything here is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _utc(moment: datetime | None, param: str) -> datetime | None:
    """A datetime to store: in UTC (SQLite keeps the wall-clock time and drops the offset, and `aware` reads
    it back as UTC), and within the calendar that Python and both databases can read back (years 1-9999)."""
    if moment is None:
        return None
    try:
        return moment.astimezone(UTC) if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    except OverflowError:
        raise InvalidRequest(param, "is outside the years 1 to 9999 once converted to UTC") from None


def _text(value: str, param: str) -> str:
    """PostgreSQL text cannot hold NUL characters (SQLite can): refuse them on both."""
    if "\x00" in value:
        raise InvalidRequest(param, "must not contain NUL characters")
    return value


@dataclass(frozen=True)
class Key:
    id: int
    prefix: str


class KeyStore:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions
        self.rate_limits = RateLimiter(sessions)

    def create_key(
        self, budget: int, name: str = "", token_budget: int | None = None, rate_limit: float | None = None,
        expires_at: datetime | None = None,
    ) -> tuple[str, KeyDescription]:  # fmt: skip
        name, expires_at = _text(name, "name"), _utc(expires_at, "expires_at")
        secret, prefix = new_key()
        row = ApiKey(prefix=prefix, key_hash=hash_key(secret), name=name, budget=budget, used=0,
                     token_budget=token_budget, tokens_used=0, rate_limit=rate_limit, rate_tokens=0.0,
                     rate_updated=0.0, expires_at=expires_at, created_at=now())  # fmt: skip
        with self.sessions.begin() as session:
            session.add(row)
        return secret, describe(row)

    def list_keys(self) -> list[KeyDescription]:
        with self.sessions() as session:
            return [describe(row) for row in session.scalars(select(ApiKey).order_by(ApiKey.id))]

    def top_up(self, prefix: str, calls: int = 0, tokens: int = 0) -> KeyDescription:
        with self.sessions.begin() as session:
            row = self._by_prefix(session, prefix)
            if row.budget + calls > MAX_COUNTER:
                raise InvalidRequest("calls", f"the budget would exceed {MAX_COUNTER} calls")
            if tokens and row.token_budget is not None and row.token_budget + tokens > MAX_COUNTER:
                raise InvalidRequest("tokens", f"the token budget would exceed {MAX_COUNTER} tokens")
            session.execute(update(ApiKey).where(ApiKey.id == row.id).values(budget=ApiKey.budget + calls))
            if tokens and row.token_budget is not None:
                session.execute(
                    update(ApiKey).where(ApiKey.id == row.id).values(token_budget=ApiKey.token_budget + tokens)
                )
            session.refresh(row)
            return describe(row)

    def revoke(self, prefix: str) -> KeyDescription:
        with self.sessions.begin() as session:
            row = self._by_prefix(session, prefix)
            row.revoked_at = row.revoked_at or now()
            return describe(row)

    @staticmethod
    def _by_prefix(session: Session, prefix: str) -> ApiKey:
        row = None if "\x00" in prefix else session.scalar(select(ApiKey).where(ApiKey.prefix == prefix))
        if row is None:
            raise APIError(ErrorCode.NOT_FOUND, f"no key with prefix {prefix}", param="prefix")
        return row

    def authenticate(self, secret: str | None) -> Key:
        """The key of `secret`: known, not revoked or expired, and within its rate limit (else 401/403/429)."""
        if not secret:
            raise APIError(ErrorCode.UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
        if row is None:
            raise APIError(ErrorCode.UNAUTHORIZED, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if row.revoked_at is not None:
            raise APIError(ErrorCode.FORBIDDEN, f"API key {row.prefix} was revoked")
        if row.expires_at is not None and aware(row.expires_at) <= now():
            raise APIError(ErrorCode.FORBIDDEN, f"API key {row.prefix} expired at {aware(row.expires_at).isoformat()}")
        if row.rate_limit:
            self.rate_limits.take(row.id)
        return Key(row.id, row.prefix)


def describe(row: ApiKey) -> KeyDescription:
    return KeyDescription(prefix=row.prefix, name=row.name, budget=row.budget, used=row.used,
                          token_budget=row.token_budget, tokens_used=row.tokens_used, rate_limit=row.rate_limit,
                          expires_at=aware(row.expires_at), revoked_at=aware(row.revoked_at),
                          created_at=aware(row.created_at))  # fmt: skip
