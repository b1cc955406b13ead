"""The account of a request made with an API key: reservations charge the key in the database."""

from __future__ import annotations

from pydantic import BaseModel

from lmaas_server import metrics
from lmaas_server.metering.meter import Charge, Key, Meter


class KeyReservation:
    def __init__(self, charge: Charge, store_response: bool):
        self.charge = charge
        self.remaining = charge.remaining
        self.store_response = store_response

    def settle(self, response: BaseModel) -> None:
        body = response.model_dump_json().encode() if self.store_response else None  # for Idempotency-Key replays
        self.charge.settle(body)
        metrics.CALLS.inc(self.charge.calls)
        metrics.TOKENS.inc(self.charge.tokens)

    def refund(self) -> None:
        self.charge.refund()


class KeyAccount:
    def __init__(self, meter: Meter, key: Key, endpoint: str, request_id: str, idempotency_key: str | None):
        self.meter = meter
        self.key = key
        self.endpoint = endpoint
        self.request_id = request_id
        self.idempotency_key = idempotency_key

    @property
    def owner(self) -> str:
        """Registered inputs belong to the key that registered them."""
        return self.key.prefix

    def replay(self) -> bytes | None:
        return self.meter.replay(self.key, self.idempotency_key, self.endpoint)

    def reserve(self, calls: int, tokens: int) -> KeyReservation:
        charge = self.meter.reserve(self.key, calls, tokens, self.endpoint, self.request_id, self.idempotency_key)
        return KeyReservation(charge, store_response=self.idempotency_key is not None)
