"""Accounts: who pays for a request, and the one way every charged route pays.

    with account.charge(calls, tokens) as charge:
        ...  # the work
        charge.settle(response)

`charge()` replays a settled request with the same Idempotency-Key (raising `Replayed`, which the API
answers with the stored body), else reserves the calls and tokens (402 when they do not fit). Leaving the
block without `settle` refunds the reservation: the caller gets an error and pays nothing.

Two accounts implement it: `KeyAccount` charges an API key in the metering database (ledger rows,
replays); `CallBudget` (budget.py) is the in-memory budget of a server run without keys. Reserving first
(atomically) means concurrent requests can never overspend; charging after the work would overspend by
the number of requests in flight.
"""

from __future__ import annotations

from types import TracebackType
from typing import Protocol

from pydantic import BaseModel

from lmaas_server import metrics
from lmaas_server.errors import APIError
from lmaas_server.metering.ledger import Charge, Stored
from lmaas_server.metering.meter import Key, Meter


class Replayed(Exception):  # not an error: the stored answer of an earlier identical request
    """Raised on entering a charge whose Idempotency-Key was settled before: answer with `body`, charge nothing."""

    def __init__(self, body: bytes, status: int = 200):
        super().__init__("idempotent replay")
        self.body = body
        self.status = status


class Reservation(Protocol):
    remaining: int | None  # calls left after this reservation (None: unlimited)

    def settle(self, body: bytes | None, http_status: int = 200) -> None: ...

    def refund(self) -> None: ...


class Account(Protocol):
    owner: str | None  # whose registered inputs this request may use (None: shared, a server without keys)
    keeps_responses: bool  # settled responses are stored for Idempotency-Key replays
    request_id: str | None  # named in the stored body of a charged error

    def replay(self) -> Stored | None: ...

    def reserve(self, calls: int, tokens: int) -> Reservation: ...

    def charge(self, calls: int, tokens: int) -> ChargeContext: ...


class ChargeContext:
    """One charged request: replay or reserve on entry, settle with the response, refund on any other exit."""

    def __init__(self, account: Account, calls: int, tokens: int):
        self.account = account
        self.calls = calls
        self.tokens = tokens
        self.reservation: Reservation | None = None
        self.settled = False
        self.paid = False  # set by `work_done`: from then on a request error is charged, not refunded

    @property
    def remaining(self) -> int | None:
        """Calls left after this charge (None: unlimited)."""
        return self.reservation.remaining

    def __enter__(self) -> ChargeContext:
        stored = self.account.replay()
        if stored is not None:
            raise Replayed(stored.body, stored.status)
        self.reservation = self.account.reserve(self.calls, self.tokens)
        return self

    def settle(self, response: BaseModel) -> None:
        """Charge for good, before the response leaves: a completed request is never refunded."""
        body = response.model_dump_json().encode() if self.account.keeps_responses else None
        self._settle(body, 200)

    def work_done(self) -> None:
        """The server did the paid work (projections materialized, forward passes run): an error in the
        caller's input found after this point (422, e.g. a prompt driving the model to NaN) is charged;
        timeouts, shutdowns and server errors are still refunded."""
        self.paid = True

    def _settle(self, body: bytes | None, http_status: int) -> None:
        self.reservation.settle(body, http_status)
        self.settled = True
        metrics.CALLS.inc(self.calls)
        metrics.TOKENS.inc(self.tokens)

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        if self.settled:
            return
        if self.paid and isinstance(error, APIError) and error.status == 422:
            body = error.body(self.account.request_id).model_dump_json().encode()  # replayed as it was
            self._settle(body if self.account.keeps_responses else None, error.status)
        else:
            self.reservation.refund()  # the caller gets an error (or nothing) and pays nothing


class KeyReservation:
    def __init__(self, charge: Charge):
        self.charge = charge
        self.remaining = charge.remaining

    def settle(self, body: bytes | None, http_status: int = 200) -> None:
        self.charge.settle(body, http_status)

    def refund(self) -> None:
        self.charge.refund()


class KeyAccount:
    """Charges an API key: one ledger row per request, replays by Idempotency-Key."""

    def __init__(
        self, meter: Meter, key: Key, endpoint: str, request_id: str, idempotency_key: str | None,
        request_hash: str | None = None,
    ):  # fmt: skip
        self.meter = meter
        self.key = key
        self.endpoint = endpoint
        self.request_id = request_id
        self.idempotency_key = idempotency_key
        self.request_hash = request_hash  # sha256 of the body: a key reused with another body is a 422
        self.keeps_responses = idempotency_key is not None

    @property
    def owner(self) -> str:
        """Registered inputs belong to the key that registered them."""
        return self.key.prefix

    def charge(self, calls: int, tokens: int) -> ChargeContext:
        return ChargeContext(self, calls, tokens)

    def replay(self) -> Stored | None:
        return self.meter.ledger.find(self.key, self.idempotency_key, self.endpoint, self.request_hash)

    def reserve(self, calls: int, tokens: int) -> KeyReservation:
        charge = self.meter.reserve(self.key, calls, tokens, self.endpoint, self.request_id, self.idempotency_key,
                                    self.request_hash)  # fmt: skip
        return KeyReservation(charge)
