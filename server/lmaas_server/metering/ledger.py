"""The ledger: atomic reservations, settlement, refunds, idempotent replays and the stale-reservation sweeper.

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

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from lmaas_protocol import IDEMPOTENCY_HEADER, ErrorCode, LedgerRecord, UsageResponse
from lmaas_server.errors import APIError, BudgetExhausted, InvalidRequest
from lmaas_server.metering.keys import Key, aware, now
from lmaas_server.metering.models import ApiKey, LedgerEntry

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 60.0


@dataclass(frozen=True)
class Stored:
    """What a settled request answered: its body (None when it had no Idempotency-Key) and HTTP status."""

    body: bytes | None
    status: int


def in_flight() -> APIError:
    return APIError(ErrorCode.CONFLICT, "a request with this Idempotency-Key is still in flight; retry",
                    headers={"Retry-After": "1"})  # fmt: skip


class Ledger:
    def __init__(self, sessions: sessionmaker[Session], replica: str, stale_after_s: float):
        self.sessions = sessions
        self.replica = replica
        self.stale_after_s = stale_after_s
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None

    def replay(
        self, key: Key, idempotency_key: str | None, endpoint: str | None = None, request_hash: str | None = None
    ) -> bytes | None:
        """The stored response of a settled request with this Idempotency-Key, if any (charged once)."""
        stored = self.find(key, idempotency_key, endpoint, request_hash)
        return None if stored is None else stored.body

    def find(
        self, key: Key, idempotency_key: str | None, endpoint: str | None = None, request_hash: str | None = None
    ) -> Stored | None:
        """The settled request with this Idempotency-Key (None: none, or refunded); 409 while in flight, 422
        when it was another endpoint's or another request body's (rows without a hash match any body)."""
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
            if request_hash is not None and entry.request_hash not in (None, request_hash):
                raise InvalidRequest(f"header.{IDEMPOTENCY_HEADER}",
                                     "this Idempotency-Key was already used with a different request body; "
                                     "send a new key for a new request")  # fmt: skip
            if entry.status == "settled":
                return Stored(entry.response, entry.http_status or 200)
            raise in_flight()

    def reserve(
        self, key: Key, calls: int, tokens: int, endpoint: str, request_id: str, idempotency_key: str | None,
        request_hash: str | None = None,
    ) -> Charge:  # fmt: skip
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
                    raise _exhausted(session.get(ApiKey, key.id), calls, tokens)
                entry = LedgerEntry(key_id=key.id, request_id=request_id, endpoint=endpoint, calls=calls, tokens=tokens,
                                    status="reserved", replica=self.replica, idempotency_key=idempotency_key,
                                    request_hash=request_hash if idempotency_key else None,
                                    created_at=now())  # fmt: skip
                session.add(entry)
                session.flush()
                entry_id = entry.id
                remaining = session.scalar(select(ApiKey.budget - ApiKey.used).where(ApiKey.id == key.id))
        except IntegrityError:  # the same Idempotency-Key raced in: the other request is in flight
            raise in_flight() from None
        return Charge(self, entry_id, calls, tokens, remaining, time.perf_counter())

    def settle(self, charge: Charge, body: bytes | None, http_status: int) -> None:
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

    def refund(self, entry_id: int, http_status: int | None = None) -> bool:
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
            rate_limit=row.rate_limit, expires_at=aware(row.expires_at),
            recent=[LedgerRecord(request_id=e.request_id, endpoint=e.endpoint, calls=e.calls, tokens=e.tokens,
                                 status=e.status, http_status=e.http_status, latency_ms=e.latency_ms,
                                 created_at=aware(e.created_at)) for e in entries],
        )  # fmt: skip

    def sweep(self, own_leftovers: bool = False) -> int:
        """Refund stale reservations (and, at start-up, this replica's own leftovers). Returns how many."""
        cutoff = now() - timedelta(seconds=self.stale_after_s)
        condition = LedgerEntry.created_at < cutoff
        if own_leftovers:
            condition = condition | (LedgerEntry.replica == self.replica)
        with self.sessions() as session:
            ids = session.scalars(select(LedgerEntry.id).where(LedgerEntry.status == "reserved", condition)).all()
        refunded = sum(self.refund(entry_id) for entry_id in ids)
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
    """One reserved ledger row: settle it with the response, or refund it."""

    ledger: Ledger
    entry_id: int
    calls: int
    tokens: int
    remaining: int | None
    started: float

    def settle(self, body: bytes | None = None, http_status: int = 200) -> None:
        self.ledger.settle(self, body, http_status)

    def refund(self, http_status: int | None = None) -> None:
        self.ledger.refund(self.entry_id, http_status)


def _exhausted(row: ApiKey, calls: int, tokens: int) -> APIError:
    if row.budget - row.used < calls:
        return BudgetExhausted(requested=calls, remaining=row.budget - row.used)
    left = row.token_budget - row.tokens_used
    error = BudgetExhausted(requested=calls, remaining=row.budget - row.used)
    error.message = f"token budget exhausted: {tokens} tokens requested, {left} remaining"
    error.details = {"requested_tokens": tokens, "remaining_tokens": left, "requested": calls,
                     "remaining": row.budget - row.used}  # fmt: skip
    return error
