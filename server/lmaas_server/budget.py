"""Accounts the engine charges: reserve before the forward pass, then settle with the response or refund.

`CallBudget` is the in-memory account of a server run without API keys (`--no-auth`, development and
tests): one counter per process, capped by `--budget`. With keys, `metering.accounts.KeyAccount` charges
the key in the database. Reserving first (atomically) means concurrent requests can never overspend;
charging after the work would overspend by the number of requests in flight.
"""

from __future__ import annotations

import threading
from typing import Protocol

from pydantic import BaseModel

from lmaas_server import metrics
from lmaas_server.errors import BudgetExhausted


class Reservation(Protocol):
    remaining: int | None  # calls left after this reservation (None: unlimited)

    def settle(self, response: BaseModel) -> None: ...

    def refund(self) -> None: ...


class Account(Protocol):
    def reserve(self, calls: int, tokens: int) -> Reservation: ...


class _MemoryReservation:
    def __init__(self, budget: CallBudget, calls: int):
        self.budget = budget
        self.calls = calls
        self.remaining = budget.remaining

    def settle(self, response: BaseModel) -> None:
        metrics.CALLS.inc(self.calls)

    def refund(self) -> None:
        self.budget.refund(self.calls)


class CallBudget:
    owner = None  # registered inputs are shared in a server without keys

    def __init__(self, limit: int | None):
        self.limit = limit  # None: unlimited
        self.used = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def reserve(self, calls: int, tokens: int = 0) -> _MemoryReservation:
        with self._lock:
            if self.limit is not None and self.used + calls > self.limit:
                raise BudgetExhausted(requested=calls, remaining=self.limit - self.used)
            self.used += calls
            return _MemoryReservation(self, calls)

    def refund(self, calls: int) -> None:
        with self._lock:
            self.used -= calls

    def replay(self) -> bytes | None:
        return None  # no ledger without keys, so no Idempotency-Key replays
