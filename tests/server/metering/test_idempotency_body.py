"""Idempotency keys bound to the request body (issue 16 item 5), on SQLite and PostgreSQL: a key reused with
a different body is a 422 naming the Idempotency-Key header (not a replay of the other request's answer), and
is not charged; the migration that adds the hash keeps older ledger rows replayable."""

from __future__ import annotations

import httpx
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from lmaas_protocol import IDEMPOTENCY_HEADER
from lmaas_server.errors import APIError
from lmaas_server.metering.db import MIGRATIONS, make_engine, migrate, session_factory
from lmaas_server.metering.meter import Key, Meter
from tests.server.metering.conftest import Database, auth, one_candidate_body
from tests.server.support import assert_error


def post(server, secret: str, body: dict, key: str):
    headers = {**auth(secret), IDEMPOTENCY_HEADER: key}
    return httpx.post(f"{server.url}/v1/evaluate", json=body, headers=headers, timeout=60)


def test_a_key_reused_with_another_body_is_422_and_not_charged(database: Database, metered_server):
    with metered_server(database) as server:
        secret, described = server.meter.create_key(20)
        ten = one_candidate_body(candidates=[{}] * 10)
        first = post(server, secret, ten, "gen-1")
        assert first.status_code == 200, first.text
        before = database.snapshot()
        error = assert_error(post(server, secret, one_candidate_body(), "gen-1"), 422, "invalid_request",
                             f"header.{IDEMPOTENCY_HEADER}")  # fmt: skip
        assert "different request body" in error["message"]
        assert database.snapshot() == before  # nothing charged, no row
        again = post(server, secret, ten, "gen-1")  # the same body still replays
        assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
        assert database.assert_consistent(described.prefix).used == 10


def test_the_meter_compares_hashes_only_where_both_are_known(database: Database):
    meter = database.meter()
    secret, _ = meter.create_key(10)
    key = meter.authenticate(secret)
    meter.reserve(key, 1, 1, "/v1/evaluate", "r1", "k1", "a" * 64).settle(b"first")
    assert meter.replay(key, "k1", "/v1/evaluate", "a" * 64) == b"first"
    assert meter.replay(key, "k1", "/v1/evaluate") == b"first"  # a caller without a hash (none given)
    with pytest.raises(APIError) as raised:
        meter.replay(key, "k1", "/v1/evaluate", "b" * 64)
    assert (raised.value.status, raised.value.param) == (422, f"header.{IDEMPOTENCY_HEADER}")
    meter.reserve(key, 1, 1, "/v1/evaluate", "r2", "k2").settle(b"unhashed")  # a row from before revision 0002
    assert meter.replay(key, "k2", "/v1/evaluate", "c" * 64) == b"unhashed"


def test_the_migration_adds_the_hash_to_a_database_at_0001(database: Database, tmp_path):
    """Downgrade a fresh database to 0001 with a settled row in it, then migrate again (to the newest revision):
    the row keeps working."""
    engine = make_engine(database.url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0001")
    with engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("ledger")}
    assert "request_hash" not in columns
    with engine.begin() as connection:
        connection.execute(sa.text("INSERT INTO api_keys (prefix, key_hash, name, budget, used, tokens_used, "
                                   "rate_tokens, rate_updated, created_at) VALUES ('lmaas_old', :h, '', 5, 1, 1, 0, 0, "
                                   "CURRENT_TIMESTAMP)"), {"h": "0" * 64})  # fmt: skip
        key_id = connection.execute(sa.text("SELECT id FROM api_keys WHERE prefix = 'lmaas_old'")).scalar()
        connection.execute(sa.text("INSERT INTO ledger (key_id, request_id, endpoint, calls, tokens, status, "
                                   "http_status, replica, idempotency_key, response, created_at) VALUES "
                                   "(:k, 'old', '/v1/evaluate', 1, 1, 'settled', 200, 'r', 'old-key', :body, "
                                   "CURRENT_TIMESTAMP)"), {"k": key_id, "body": b"old answer"})  # fmt: skip
    migrate(engine)
    with engine.connect() as connection:
        columns = {c["name"] for c in sa.inspect(connection).get_columns("ledger")}
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    assert "request_hash" in columns
    meter = Meter(session_factory(engine), "r", 900.0)
    assert meter.replay(Key(key_id, "lmaas_old"), "old-key", "/v1/evaluate", "d" * 64) == b"old answer"
    engine.dispose()
