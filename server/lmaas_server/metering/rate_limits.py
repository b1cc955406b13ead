"""Per-key rate limits: a token bucket kept in the key's row, so every replica shares it."""

from __future__ import annotations

import math
import time

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from lmaas_protocol import ErrorCode
from lmaas_server.errors import APIError
from lmaas_server.metering.models import ApiKey

ATTEMPTS = 20  # compare-and-swap rounds before answering 429 "contention"


def retry_after(seconds: float) -> str:
    """Retry-After in whole seconds, as RFC 9110 defines it: rounded up, at least 1."""
    return str(max(1, math.ceil(seconds)))


class RateLimiter:
    def __init__(self, sessions: sessionmaker[Session]):
        self.sessions = sessions

    def take(self, key_id: int) -> None:
        """Take one token from the key's bucket (updated by compare-and-swap); 429 when it is empty."""
        for _ in range(ATTEMPTS):
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
                    wait = retry_after((1.0 - tokens) / rate)
                    raise APIError(ErrorCode.RATE_LIMITED, f"rate limit of {rate:g} requests/s exceeded",
                                   headers={"Retry-After": wait}, details={"rate_limit": rate})  # fmt: skip
                swapped = session.execute(
                    update(ApiKey)
                    .where(ApiKey.id == key_id, ApiKey.rate_updated == row.rate_updated)
                    .values(rate_tokens=tokens - 1.0, rate_updated=moment)
                )
                if swapped.rowcount == 1:
                    return
        raise APIError(ErrorCode.RATE_LIMITED, "rate limit contention; retry", headers={"Retry-After": "1"})
