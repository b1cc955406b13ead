"""The meter: one metering database seen as its keys (admin, authentication) and its ledger (charges).

`KeyStore` (keys.py, with rate limits in rate_limits.py) and `Ledger` (ledger.py) are the two halves, plus
the keys' deployed prompts (`PromptStore`, prompt_store.py); the meter hands requests to them and is what
the app, the CLI and the admin routes hold.
"""

from __future__ import annotations

import socket

from sqlalchemy.orm import Session, sessionmaker

from lmaas_server.metering.keys import Key, KeyStore, hash_key
from lmaas_server.metering.ledger import Charge, Ledger
from lmaas_server.metering.prompt_store import PromptStore

__all__ = ["Charge", "Key", "Meter", "build_meter", "hash_key"]


class Meter:
    def __init__(
        self, sessions: sessionmaker[Session], replica: str, stale_after_s: float, max_prompts_per_key: int = 100
    ):
        self.sessions = sessions
        self.replica = replica
        self.keys = KeyStore(sessions)
        self.ledger = Ledger(sessions, replica, stale_after_s)
        self.prompts = PromptStore(sessions, max_prompts_per_key)  # deployed prompts, per key
        # the admin and request side, named as the routes and the CLI call them
        self.create_key, self.list_keys, self.top_up = self.keys.create_key, self.keys.list_keys, self.keys.top_up
        self.revoke, self.authenticate = self.keys.revoke, self.keys.authenticate
        self.replay, self.reserve, self.usage = self.ledger.replay, self.ledger.reserve, self.ledger.usage
        self._refund, self.sweep = self.ledger.refund, self.ledger.sweep

    def start_sweeper(self) -> None:
        self.ledger.start_sweeper()

    def close(self) -> None:
        self.ledger.close()


def build_meter(settings) -> Meter:
    """Open (and migrate) the metering database of `settings` (a `lmaas_server.config.Settings`). Lives here,
    not in `main`, so that `lmaas-server keys ...` opens the database without importing torch."""
    from lmaas_server.metering.db import make_engine, migrate, session_factory

    database = make_engine(settings.database_url)
    migrate(database)
    replica = settings.replica_id or f"{socket.gethostname()}:{settings.port}"
    return Meter(session_factory(database), replica, settings.stale_reservation_s, settings.max_prompts_per_key)
