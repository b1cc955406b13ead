"""The meter: keys, atomic reservations, settlement, refunds, idempotent replays and rate limits.

Charging protocol (every step one transaction, the same on SQLite and PostgreSQL):
1. reserve — ``UPDATE api_keys SET used = used + n ... WHERE used + n <= budget`` (and the token budget)
   plus a ``reserved`` ledger row; zero rows updated means 402, and nothing was charged;
2. the work;
3. settle — the ledger row becomes ``settled`` with the response kept for Idempotency-Key replays; or
   refund — the row becomes ``refunded`` and the reservation is given back, in one transaction that only
   succeeds while the row is still ``reserved`` (so nothing is refunded twice).
Reservations of a crashed process: a replica refunds its own leftover ``reserved`` rows when it starts
(they cannot be in flight), and any replica refunds rows older than `stale_after_s` (well above the
request timeout). A completed request was settled before its response was sent, so it is never refunded.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lmaas_protocol import IDEMPOTENCY_HEADER, ErrorCode, KeyDescription, LedgerRecord, UsageResponse
from lmaas_server.errors import APIError, BudgetExhausted, InvalidRequest
from lmaas_server.metering.models import ApiKey, LedgerEntry

log = logging.getLogger(__name__)

KEY_PREFIX = "lmaas_"
SWEEP_EVERY_S = 60.0
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


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite returns naive datetimes; everything here is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


def _utc(moment: datetime | None, param: str) -> datetime | None:
    """A datetime to store: in UTC (SQLite keeps the wall-clock time and drops the offset, and `_aware` reads
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


class Meter:
    def __init__(self, sessions: sessionmaker[Session], replica: str, stale_after_s: float):
        self.sessions = sessions
        self.replica = replica
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- keys

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

    # ----------------------------------------------------------------------------------------- requests

    def authenticate(self, secret: str | None) -> Key:
        if not secret:
            raise APIError(ErrorCode.UNAUTHORIZED, "missing API key: send Authorization: Bearer <key>",
                           headers={"WWW-Authenticate": "Bearer"})  # fmt: skip
        with self.sessions() as session:
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret)))
        if row is None:
            raise APIError(ErrorCode.UNAUTHORIZED, "unknown API key", headers={"WWW-Authenticate": "Bearer"})
        if row.revoked_at is not None:
            raise APIError(ErrorCode.FORBIDDEN, f"API key {row.prefix} was revoked")
        if row.expires_at is not None and _aware(row.expires_at) <= now():
            raise APIError(ErrorCode.FORBIDDEN, f"API key {row.prefix} expired at {_aware(row.expires_at).isoformat()}")
        if row.rate_limit:
            self._take_rate_token(row.id)
        return Key(row.id, row.prefix)

    def _take_rate_token(self, key_id: int) -> None:
        """A token bucket kept in the key's row (shared by replicas), updated by compare-and-swap."""
        for _ in range(20):
            with self.sessions.begin() as session:
                row = session.get(ApiKey, key_id)
                moment, rate = time.time(), float(row.rate_limit)
                capacity = max(1.0, rate)  # a burst of one second's worth
                tokens = (
                    capacity
                    if row.rate_updated == 0
                    else min(capacity, row.rate_tokens + (moment - row.rate_updated) * rate)
                )
                if tokens < 1.0:
                    retry = (1.0 - tokens) / rate
                    raise APIError(ErrorCode.RATE_LIMITED, f"rate limit of {rate:g} requests/s exceeded",
                                   headers={"Retry-After": f"{max(retry, 0.001):.3f}"}, details={"rate_limit": rate})  # fmt: skip
                swapped = session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id, ApiKey.rate_updated == row.rate_updated)
                    .values(rate_tokens=tokens - 1.0, rate_updated=moment)
                )
                if swapped.rowcount == 1:
                    return
        raise APIError(ErrorCode.RATE_LIMITED, "rate limit contention; retry", headers={"Retry-After": "0.1"})

    def replay(self, key: Key, idempotency_key: str | None, endpoint: str | None = None) -> bytes | None:
        """The stored response of a settled request with this Idempotency-Key, if any (charged once)."""
        if not idempotency_key:
            return None
        with self.sessions.begin() as session:
            entry = session.scalar(
                select(LedgerEntry).where(LedgerEntry.key_id == key.id, LedgerEntry.idempotency_key == idempotency_key)
            )
            if entry is None:
                return None
            if entry.status == "refunded":
                entry.idempotency_key = None  # free the key for this retry, keep the row as history
                return None
            if endpoint is not None and entry.endpoint != endpoint:  # its response is another endpoint's
                raise InvalidRequest(f"header.{IDEMPOTENCY_HEADER}",
                                     f"this Idempotency-Key was already used for {entry.endpoint}")  # fmt: skip
            if entry.status == "settled":
                return entry.response
            raise APIError(ErrorCode.CONFLICT, "a request with this Idempotency-Key is still in flight; retry",
                           headers={"Retry-After": "1"})  # fmt: skip

    def reserve(
        self, key: Key, calls: int, tokens: int, endpoint: str, request_id: str, idempotency_key: str | None
    ) -> Charge:
        """Atomically reserve calls and tokens and record the request; 402 when the budget cannot cover it."""
        try:
            with self.sessions.begin() as session:
                fits = ApiKey.used + calls <= ApiKey.budget
                tokens_fit = (ApiKey.token_budget.is_(None)) | (ApiKey.tokens_used + tokens <= ApiKey.token_budget)
                reserved = session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key.id, fits, tokens_fit)
                    .values(used=ApiKey.used + calls, tokens_used=ApiKey.tokens_used + tokens)
                )
                if reserved.rowcount != 1:
                    row = session.get(ApiKey, key.id)
                    raise _exhausted(row, calls, tokens)
                entry = LedgerEntry(key_id=key.id, request_id=request_id, endpoint=endpoint, calls=calls, tokens=tokens,
                                    status="reserved", replica=self.replica, idempotency_key=idempotency_key,
                                    created_at=now())  # fmt: skip
                session.add(entry)
                session.flush()
                entry_id = entry.id
                remaining = session.scalar(select(ApiKey.budget - ApiKey.used).where(ApiKey.id == key.id))
        except IntegrityError:  # the same Idempotency-Key raced in: the other request is in flight
            raise APIError(ErrorCode.CONFLICT, "a request with this Idempotency-Key is still in flight; retry",
                           headers={"Retry-After": "1"}) from None  # fmt: skip
        return Charge(self, entry_id, calls, tokens, remaining, time.perf_counter())

    def _settle(self, charge: Charge, body: bytes | None, http_status: int) -> None:
        latency = (time.perf_counter() - charge.started) * 1000
        with self.sessions.begin() as session:
            done = session.execute(
                update(LedgerEntry)
                .where(LedgerEntry.id == charge.entry_id, LedgerEntry.status == "reserved")
                .values(status="settled", http_status=http_status, latency_ms=latency, response=body, settled_at=now())
            )
            if done.rowcount != 1:  # swept as stale meanwhile: charge again rather than give work away
                log.warning("ledger row %s settled after being refunded as stale", charge.entry_id)
                entry = session.get(LedgerEntry, charge.entry_id)
                session.execute(update(ApiKey).where(ApiKey.id == entry.key_id)
                                .values(used=ApiKey.used + entry.calls, tokens_used=ApiKey.tokens_used + entry.tokens))  # fmt: skip
                entry.status, entry.response, entry.settled_at = "settled", body, now()

    def _refund(self, entry_id: int, http_status: int | None = None) -> bool:
        """Give a reservation back; True if this call did it (a row is refunded at most once)."""
        with self.sessions.begin() as session:
            done = session.execute(
                update(LedgerEntry)
                .where(LedgerEntry.id == entry_id, LedgerEntry.status == "reserved")
                .values(status="refunded", http_status=http_status, settled_at=now())
            )
            if done.rowcount != 1:
                return False
            entry = session.get(LedgerEntry, entry_id)
            session.execute(update(ApiKey).where(ApiKey.id == entry.key_id)
                            .values(used=ApiKey.used - entry.calls, tokens_used=ApiKey.tokens_used - entry.tokens))  # fmt: skip
            return True

    # ----------------------------------------------------------------------------------------- reporting

    def usage(self, key: Key, recent: int = 20) -> UsageResponse:
        with self.sessions() as session:
            row = session.get(ApiKey, key.id)
            entries = session.scalars(
                select(LedgerEntry).where(LedgerEntry.key_id == key.id).order_by(LedgerEntry.id.desc()).limit(recent)
            ).all()
        token_left = None if row.token_budget is None else row.token_budget - row.tokens_used
        return UsageResponse(
            key_prefix=row.prefix, name=row.name, budget=row.budget, used=row.used, remaining=row.budget - row.used,
            token_budget=row.token_budget, tokens_used=row.tokens_used, tokens_remaining=token_left,
            rate_limit=row.rate_limit, expires_at=_aware(row.expires_at),
            recent=[LedgerRecord(request_id=e.request_id, endpoint=e.endpoint, calls=e.calls, tokens=e.tokens,
                                 status=e.status, http_status=e.http_status, latency_ms=e.latency_ms,
                                 created_at=_aware(e.created_at)) for e in entries],
        )  # fmt: skip

    # ----------------------------------------------------------------------------------------- recovery

    def sweep(self, own_leftovers: bool = False) -> int:
        """Refund stale reservations (and, at start-up, this replica's own leftovers). Returns how many."""
        cutoff = now() - timedelta(seconds=self.stale_after_s)
        condition = LedgerEntry.created_at < cutoff
        if own_leftovers:
            condition = condition | (LedgerEntry.replica == self.replica)
        with self.sessions() as session:
            ids = session.scalars(select(LedgerEntry.id).where(LedgerEntry.status == "reserved", condition)).all()
        refunded = sum(self._refund(entry_id) for entry_id in ids)
        if refunded:
            log.warning("refunded %d unfinished reservation(s) left by a stopped or stuck request", refunded)
        return refunded

    def start_sweeper(self) -> None:
        self.sweep(own_leftovers=True)

        def loop() -> None:
            while not self._stop.wait(SWEEP_EVERY_S):
                try:
                    self.sweep()
                except Exception:
                    log.exception("reservation sweep failed")

        self._sweeper = threading.Thread(target=loop, name="lmaas-sweeper", daemon=True)
        self._sweeper.start()

    def close(self) -> None:
        self._stop.set()


@dataclass
class Charge:
    """A reservation: settle it with the response, or refund it."""

    meter: Meter
    entry_id: int
    calls: int
    tokens: int
    remaining: int | None
    started: float

    def settle(self, body: bytes | None = None, http_status: int = 200) -> None:
        self.meter._settle(self, body, http_status)

    def refund(self, http_status: int | None = None) -> None:
        self.meter._refund(self.entry_id, http_status)


def _exhausted(row: ApiKey, calls: int, tokens: int) -> APIError:
    if row.budget - row.used < calls:
        return BudgetExhausted(requested=calls, remaining=row.budget - row.used)
    left = row.token_budget - row.tokens_used
    error = BudgetExhausted(requested=calls, remaining=row.budget - row.used)
    error.message = f"token budget exhausted: {tokens} tokens requested, {left} remaining"
    error.details = {"requested_tokens": tokens, "remaining_tokens": left, "requested": calls,
                     "remaining": row.budget - row.used}  # fmt: skip
    return error


def describe(row: ApiKey) -> KeyDescription:
    return KeyDescription(prefix=row.prefix, name=row.name, budget=row.budget, used=row.used,
                          token_budget=row.token_budget, tokens_used=row.tokens_used, rate_limit=row.rate_limit,
                          expires_at=_aware(row.expires_at), revoked_at=_aware(row.revoked_at),
                          created_at=_aware(row.created_at))  # fmt: skip


def build_meter(settings) -> Meter:
    """Open (and migrate) the metering database of `settings` (a `lmaas_server.config.Settings`). Lives here,
    not in `main`, so that `lmaas-server keys ...` opens the database without importing torch."""
    from lmaas_server.metering.db import make_engine, migrate, session_factory

    database = make_engine(settings.database_url)
    migrate(database)
    replica = settings.replica_id or f"{socket.gethostname()}:{settings.port}"
    return Meter(session_factory(database), replica, settings.stale_reservation_s)
