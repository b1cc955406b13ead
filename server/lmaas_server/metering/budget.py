"""The account of a server run without API keys (`--no-auth`, development and tests).

One in-memory counter per process, capped by `--budget`; it charges through the same `ChargeContext` as a
key (accounts.py), without a ledger and so without Idempotency-Key replays.
"""

from __future__ import annotations

import threading

from lmaas_server.errors import BudgetExhausted
from lmaas_server.metering.accounts import ChargeContext


class _MemoryReservation:
    def __init__(self, budget: CallBudget, calls: int):
        self.budget = budget
        self.calls = calls
        self.remaining = budget.remaining

    def settle(self, body: bytes | None, http_status: int = 200) -> None:
        pass  # already counted by the reservation

    def refund(self) -> None:
        self.budget.refund(self.calls)


class CallBudget:
    owner = None  # registered inputs are shared in a server without keys
    keeps_responses = False
    request_id = None

    def __init__(self, limit: int | None):
        self.limit = limit  # None: unlimited
        self.used = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def charge(self, calls: int, tokens: int = 0) -> ChargeContext:
        return ChargeContext(self, calls, tokens)

    def reserve(self, calls: int, tokens: int = 0) -> _MemoryReservation:
        with self._lock:
            if self.limit is not None and self.used + calls > self.limit:
                raise BudgetExhausted(requested=calls, remaining=self.limit - self.used)
            self.used += calls
            return _MemoryReservation(self, calls)

    def refund(self, calls: int) -> None:
        with self._lock:
            self.used -= calls

    def replay(self) -> None:
        return None  # no ledger without keys, so no Idempotency-Key replays
