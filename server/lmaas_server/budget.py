"""A per-server call budget: reserve before the forward pass, refund if it fails.

Reserving first (under a lock) means concurrent requests can never overspend; charging after the work
would overspend by the number of requests in flight.
"""

from __future__ import annotations

import threading

from lmaas_server.errors import BudgetExhausted


class CallBudget:
    def __init__(self, limit: int | None):
        self.limit = limit  # None: unlimited
        self.used = 0
        self._lock = threading.Lock()

    @property
    def remaining(self) -> int | None:
        return None if self.limit is None else self.limit - self.used

    def reserve(self, calls: int) -> None:
        with self._lock:
            if self.limit is not None and self.used + calls > self.limit:
                raise BudgetExhausted(requested=calls, remaining=self.limit - self.used)
            self.used += calls

    def refund(self, calls: int) -> None:
        with self._lock:
            self.used -= calls
