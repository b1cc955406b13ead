"""The Meter itself, in-process on SQLite and PostgreSQL: keys, authentication, reserve/settle/refund
transitions, at-most-once refunds under races, the sweep rules, idempotent replays, the rate-limit token
bucket shared by replicas (two Meter objects with their own connection pools) and the usage report."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest

from lmaas_protocol import ErrorCode, KeyCreateRequest
from lmaas_server.errors import APIError
from lmaas_server.metering.meter import Key, Meter, hash_key
from lmaas_server.metering.models import ApiKey
from tests.server.metering.conftest import Database, run_threads, size

KEY_FORMAT = re.compile(r"^(lmaas_[A-Za-z0-9_-]{8})_[A-Za-z0-9_-]{43}$")


def new_key(meter: Meter, budget: int = 10, **options) -> tuple[str, Key]:
    secret, _ = meter.create_key(budget, **options)
    return secret, meter.authenticate(secret)


def error_of(call) -> APIError:
    with pytest.raises(APIError) as caught:
        call()
    return caught.value


# ----------------------------------------------------------------------------------------------- keys


def test_create_list_top_up_and_revoke_keys(database: Database):
    meter = database.meter()
    secret, described = meter.create_key(5, name="alice", token_budget=100, rate_limit=3.5)
    match = KEY_FORMAT.match(secret)
    assert match and match.group(1) == described.prefix
    assert (described.name, described.budget, described.used, described.token_budget, described.tokens_used) == (
        "alice", 5, 0, 100, 0,
    )  # fmt: skip
    assert described.rate_limit == 3.5 and described.revoked_at is None and described.expires_at is None
    assert described.created_at.tzinfo is not None
    row = database.key_row(described.prefix)
    assert row.key_hash == hash_key(secret) and secret not in (row.key_hash, row.prefix, row.name)

    other, _ = meter.create_key(1)
    assert other != secret
    listed = meter.list_keys()
    assert [k.prefix for k in listed] == [described.prefix, KEY_FORMAT.match(other).group(1)]
    assert "key" not in listed[0].model_dump() and secret not in listed[0].model_dump_json()

    topped = meter.top_up(described.prefix, calls=7, tokens=50)
    assert (topped.budget, topped.token_budget) == (12, 150)
    no_token_budget = KEY_FORMAT.match(other).group(1)
    assert meter.top_up(no_token_budget, tokens=50).token_budget is None  # no token limit stays no limit

    revoked = meter.revoke(described.prefix)
    assert revoked.revoked_at is not None
    assert meter.revoke(described.prefix).revoked_at == revoked.revoked_at  # revoking again keeps the first time
    for call in (lambda: meter.top_up("lmaas_nope", 1), lambda: meter.revoke("lmaas_nope")):
        error = error_of(call)
        assert (error.code, error.status, error.param) == (ErrorCode.NOT_FOUND, 404, "prefix")


def test_authenticate_rejects_missing_unknown_revoked_and_expired_keys(database: Database):
    meter = database.meter()
    for secret in (None, ""):
        error = error_of(lambda s=secret: meter.authenticate(s))
        assert (error.code, error.status) == (ErrorCode.UNAUTHORIZED, 401)
        assert error.headers == {"WWW-Authenticate": "Bearer"}
    error = error_of(lambda: meter.authenticate("lmaas_unknown_" + "x" * 43))
    assert (error.code, error.status) == (ErrorCode.UNAUTHORIZED, 401)

    revoked, described = meter.create_key(5)
    meter.revoke(described.prefix)
    error = error_of(lambda: meter.authenticate(revoked))
    assert (error.code, error.status) == (ErrorCode.FORBIDDEN, 403) and "revoked" in error.message

    expired, _ = meter.create_key(5, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    error = error_of(lambda: meter.authenticate(expired))
    assert (error.code, error.status) == (ErrorCode.FORBIDDEN, 403) and "expired" in error.message

    valid, described = meter.create_key(5, expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert meter.authenticate(valid) == Key(database.key_row(described.prefix).id, described.prefix)


@pytest.mark.parametrize("hours", [-5, 0, 9])
def test_an_expiry_in_any_utc_offset_means_the_same_instant(database: Database, hours):
    """The admin API accepts `expires_at` with any UTC offset (as ISO 8601 allows): an hour from now is an
    hour from now, whatever the offset it is written in. (Found a bug: SQLite kept the wall-clock time and
    dropped the offset, so a key written in UTC-05:00 expired five hours early.)"""
    meter = database.meter()
    instant = datetime.now(UTC) + timedelta(hours=1)
    given = instant.astimezone(timezone(timedelta(hours=hours))).isoformat()
    expires_at = KeyCreateRequest.model_validate({"budget": 1, "expires_at": given}).expires_at
    secret, described = meter.create_key(1, expires_at=expires_at)
    assert described.expires_at == instant and meter.list_keys()[-1].expires_at == instant
    meter.authenticate(secret)  # not expired: it expires in an hour
    gone, _ = meter.create_key(
        1, expires_at=(instant - timedelta(hours=2)).astimezone(timezone(timedelta(hours=hours)))
    )
    assert error_of(lambda: meter.authenticate(gone)).status == 403  # an hour ago, whatever the offset


def test_values_the_database_cannot_hold_are_refused_not_500(database: Database):
    """NUL characters (PostgreSQL text cannot hold them), expiries outside the years 1-9999 in UTC (they
    could be stored but never read back) and budgets past BIGINT: 422 (404 for a prefix), nothing stored."""
    meter = database.meter()
    _, described = meter.create_key(10, name="bystander", token_budget=10**18)
    before = database.snapshot()
    cases = [
        (lambda: meter.create_key(1, name="a\x00b"), 422, "name"),
        (lambda: meter.create_key(1, expires_at=datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1)))), 422, "expires_at"),
        (lambda: meter.create_key(1, expires_at=datetime(9999, 12, 31, 23, tzinfo=timezone(timedelta(hours=-2)))), 422,
         "expires_at"),
        (lambda: meter.top_up("lmaas_\x00x", calls=1), 404, "prefix"),
        (lambda: meter.revoke("lmaas_\x00x"), 404, "prefix"),
        (lambda: meter.top_up(described.prefix, calls=2**63 - 10), 422, "calls"),
        (lambda: meter.top_up(described.prefix, tokens=2**63 - 10**18), 422, "tokens"),
    ]  # fmt: skip
    for call, status, param in cases:
        error = error_of(call)
        assert (error.status, error.param) == (status, param), error.message
        assert database.snapshot() == before
    assert [key.name for key in meter.list_keys()] == ["bystander"]
    assert meter.top_up(described.prefix, calls=2**63 - 11, tokens=2**63 - 1 - 10**18).budget == 2**63 - 1  # the edge


# ----------------------------------------------------------------------------------------------- transitions


def test_reserve_then_settle_charges_and_keeps_the_response(database: Database):
    meter = database.meter("r1")
    _, key = new_key(meter, budget=10, token_budget=1000)
    charge = meter.reserve(key, 3, 120, "/v1/evaluate", "req-1", "idem-1")
    assert charge.remaining == 7 and (charge.calls, charge.tokens) == (3, 120)
    (row,) = database.ledger(key.prefix)
    assert (row.status, row.calls, row.tokens, row.replica, row.request_id, row.endpoint, row.idempotency_key) == (
        "reserved", 3, 120, "r1", "req-1", "/v1/evaluate", "idem-1",
    )  # fmt: skip
    assert row.settled_at is None and row.response is None and row.http_status is None
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.tokens_used, totals.reserved) == (3, 120, 3)

    charge.settle(b'{"ok": 1}')
    (row,) = database.ledger(key.prefix)
    assert (row.status, row.http_status, row.response) == ("settled", 200, b'{"ok": 1}')
    assert row.settled_at is not None and row.latency_ms is not None and row.latency_ms >= 0
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.tokens_used, totals.settled, totals.reserved) == (3, 120, 3, 0)
    assert meter._refund(charge.entry_id) is False  # a settled row is never refunded
    assert database.assert_consistent(key.prefix).used == 3


def test_reserve_then_refund_gives_everything_back(database: Database):
    meter = database.meter()
    _, key = new_key(meter, budget=4, token_budget=50)
    charge = meter.reserve(key, 4, 50, "/v1/evaluate", "req-2", None)
    assert charge.remaining == 0
    charge.refund(http_status=504)
    (row,) = database.ledger(key.prefix)
    assert (row.status, row.http_status) == ("refunded", 504) and row.settled_at is not None
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.tokens_used, totals.refunded) == (0, 0, 4)
    charge.refund()  # again: nothing more is given back
    assert database.assert_consistent(key.prefix).used == 0
    assert meter.reserve(key, 4, 50, "/v1/evaluate", "req-3", None).remaining == 0  # the budget is whole again


def test_settling_a_row_refunded_as_stale_charges_it_again(database: Database):
    """A slow request whose reservation a sweep refunded still settles: the work was done and is charged."""
    meter = database.meter()
    _, key = new_key(meter, budget=5)
    charge = meter.reserve(key, 2, 10, "/v1/evaluate", "slow", None)
    assert meter._refund(charge.entry_id) is True
    assert database.assert_consistent(key.prefix).used == 0
    charge.settle(b"late")
    (row,) = database.ledger(key.prefix)
    assert (row.status, row.response) == ("settled", b"late")
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.tokens_used, totals.settled) == (2, 10, 2)


def test_a_reservation_over_the_budget_is_402_and_charges_nothing(database: Database):
    meter = database.meter()
    _, key = new_key(meter, budget=5)
    meter.reserve(key, 3, 0, "/v1/evaluate", "a", None).settle()
    before = database.snapshot()
    error = error_of(lambda: meter.reserve(key, 3, 0, "/v1/evaluate", "b", None))
    assert (error.code, error.status, error.details) == (
        ErrorCode.BUDGET_EXHAUSTED,
        402,
        {"requested": 3, "remaining": 2},
    )
    assert database.snapshot() == before  # no counter moved, no ledger row
    assert meter.reserve(key, 2, 0, "/v1/evaluate", "c", None).remaining == 0  # exactly the rest fits
    error = error_of(lambda: meter.reserve(key, 1, 0, "/v1/evaluate", "d", None))
    assert error.details == {"requested": 1, "remaining": 0}


def test_a_reservation_over_the_token_budget_is_402_with_token_details(database: Database):
    meter = database.meter()
    _, key = new_key(meter, budget=100, token_budget=100)
    meter.reserve(key, 1, 60, "/v1/evaluate", "a", None).settle()
    before = database.snapshot()
    error = error_of(lambda: meter.reserve(key, 1, 41, "/v1/evaluate", "b", None))
    assert (error.code, error.status) == (ErrorCode.BUDGET_EXHAUSTED, 402)
    assert error.details == {"requested_tokens": 41, "remaining_tokens": 40, "requested": 1, "remaining": 99}
    assert "token budget" in error.message
    assert database.snapshot() == before
    meter.reserve(key, 1, 40, "/v1/evaluate", "c", None).settle()
    assert database.assert_consistent(key.prefix).tokens_used == 100


def test_concurrent_reservations_never_overspend(database: Database):
    meters = [database.meter("p"), database.meter("q", own_pool=True)]
    _, key = new_key(meters[0], budget=size(40, 200))
    attempts, threads = size(4, 8), size(20, 50)

    def client(i: int) -> list[int]:
        outcomes = []
        for j in range(attempts):
            try:
                meters[i % 2].reserve(key, 1, 1, "/v1/evaluate", f"{i}-{j}", None).settle()
                outcomes.append(200)
            except APIError as exc:
                outcomes.append(exc.status)
        return outcomes

    outcomes = [status for result in run_threads(threads, client) for status in result]
    budget = database.key_row(key.prefix).budget
    assert outcomes.count(200) == budget and outcomes.count(402) == threads * attempts - budget
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.settled, totals.rows) == (budget, budget, budget)


def test_a_row_is_refunded_at_most_once_even_when_refunds_race(database: Database):
    """Two replicas (own connection pools) refund the same rows at the same moment: one wins per row."""
    meters = [database.meter("x"), database.meter("y", own_pool=True)]
    _, key = new_key(meters[0], budget=1000, token_budget=10**6)
    rows = size(12, 100)
    charges = [meters[0].reserve(key, 1 + i % 3, 10, "/v1/evaluate", f"r{i}", None) for i in range(rows)]
    reserved = database.assert_consistent(key.prefix).used
    assert reserved == sum(c.calls for c in charges)

    wins = []
    for charge in charges:
        wins.append(run_threads(2, lambda i, c=charge: meters[i]._refund(c.entry_id)))
    assert all(sorted(w) == [False, True] for w in wins), wins
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.tokens_used, totals.refunded, totals.reserved) == (0, 0, reserved, 0)
    assert totals.statuses == {"refunded": rows}


# ----------------------------------------------------------------------------------------------- sweeps


def test_sweep_rules(database: Database):
    """Start-up refunds a replica's own leftovers (any age); any replica refunds rows older than
    stale_after_s; fresh rows of other replicas and settled rows are never touched."""
    a, b = database.meter("a"), database.meter("b", own_pool=True)
    _, key = new_key(a, budget=100)

    def reserve(meter: Meter, name: str):
        return meter.reserve(key, 1, 1, "/v1/evaluate", name, None)

    own_fresh, settled_old = reserve(a, "own-fresh"), reserve(a, "settled-old")
    other_fresh, other_old, own_old = reserve(b, "other-fresh"), reserve(b, "other-old"), reserve(a, "own-old")
    settled_old.settle(b"{}")
    for name in ("settled-old", "other-old", "own-old"):
        assert database.backdate(1000, request_id=name) == 1

    def status() -> dict[str, str]:
        return {row.request_id: row.status for row in database.ledger(key.prefix)}

    assert a.sweep() == 2  # the stale rows only (older than 900 s), whoever reserved them
    assert status() == {"own-fresh": "reserved", "settled-old": "settled", "other-fresh": "reserved",
                        "other-old": "refunded", "own-old": "refunded"}  # fmt: skip
    assert a.sweep() == 0
    assert a.sweep(own_leftovers=True) == 1  # + a's own rows, however fresh
    assert status()["own-fresh"] == "refunded" and status()["other-fresh"] == "reserved"
    assert database.assert_consistent(key.prefix).used == 2  # settled-old + other-fresh

    c = database.meter("c", stale_after_s=0.2, own_pool=True)  # another replica with a small threshold
    time.sleep(0.3)
    assert c.sweep() == 1
    assert status()["other-fresh"] == "refunded"
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.settled, totals.reserved) == (1, 1, 0)
    other_fresh.settle(b"{}")  # the request behind it finishes after all: charged once more, not lost
    assert database.assert_consistent(key.prefix).used == 2
    assert own_fresh and other_old and own_old


def test_start_sweeper_refunds_own_leftovers_at_once_and_close_stops_it(database: Database):
    a = database.meter("restarting")
    _, key = new_key(a, budget=10)
    a.reserve(key, 3, 3, "/v1/evaluate", "left-over", None)
    database.meter("someone-else").reserve(key, 2, 2, "/v1/evaluate", "in-flight-elsewhere", None)
    restarted = database.meter("restarting", own_pool=True)
    restarted.start_sweeper()
    try:
        assert restarted.ledger._sweeper.is_alive()
        statuses = {row.request_id: row.status for row in database.ledger(key.prefix)}
        assert statuses == {"left-over": "refunded", "in-flight-elsewhere": "reserved"}
        assert database.assert_consistent(key.prefix).used == 2
    finally:
        restarted.close()
    restarted.ledger._sweeper.join(timeout=5)
    assert not restarted.ledger._sweeper.is_alive()


# ----------------------------------------------------------------------------------------------- replays


def test_replay_of_reserved_settled_and_refunded_requests(database: Database):
    meter = database.meter()
    _, key = new_key(meter, budget=10)
    assert meter.replay(key, None) is None and meter.replay(key, "never-seen") is None

    charge = meter.reserve(key, 1, 1, "/v1/evaluate", "r1", "k1")
    error = error_of(lambda: meter.replay(key, "k1"))
    assert (error.code, error.status, error.headers) == (ErrorCode.CONFLICT, 409, {"Retry-After": "1"})
    charge.settle(b'{"first": true}')
    assert meter.replay(key, "k1") == b'{"first": true}'
    assert meter.replay(key, "k1") == b'{"first": true}'  # as often as asked, never charged again
    assert database.assert_consistent(key.prefix).used == 1

    failed = meter.reserve(key, 1, 1, "/v1/evaluate", "r2", "k2")
    failed.refund()
    assert meter.replay(key, "k2") is None  # a refunded attempt frees its key for the retry...
    meter.reserve(key, 1, 1, "/v1/evaluate", "r3", "k2").settle(b"retried")
    assert meter.replay(key, "k2") == b"retried"
    rows = {row.request_id: (row.status, row.idempotency_key) for row in database.ledger(key.prefix)}
    assert rows == {"r1": ("settled", "k1"), "r2": ("refunded", None), "r3": ("settled", "k2")}  # ...kept as history
    assert database.assert_consistent(key.prefix).used == 2

    # a key's stored response belongs to its endpoint: 422 elsewhere (settled or in flight), unless refunded
    assert meter.replay(key, "k2", "/v1/evaluate") == b"retried"
    error = error_of(lambda: meter.replay(key, "k2", "/v1/layer_std"))
    assert (error.status, error.param) == (422, "header.Idempotency-Key") and "/v1/evaluate" in error.message
    in_flight = meter.reserve(key, 1, 1, "/v1/evaluate", "r5", "k5")
    assert error_of(lambda: meter.replay(key, "k5", "/v1/layer_std")).status == 422
    assert error_of(lambda: meter.replay(key, "k5", "/v1/evaluate")).status == 409
    in_flight.refund()
    assert meter.replay(key, "k5", "/v1/layer_std") is None  # refunded: free for any endpoint
    meter.reserve(key, 1, 1, "/v1/layer_std", "r6", "k5").settle(b"layer")
    assert meter.replay(key, "k5", "/v1/layer_std") == b"layer"
    assert database.assert_consistent(key.prefix).used == 3

    _, other = new_key(meter, budget=10)  # idempotency keys are per API key
    assert meter.replay(other, "k1") is None
    meter.reserve(other, 1, 1, "/v1/evaluate", "r4", "k1").settle(b"other")
    assert meter.replay(other, "k1") == b"other" and meter.replay(key, "k1") == b'{"first": true}'


def test_the_same_idempotency_key_reserved_concurrently_is_charged_once(database: Database):
    meters = [database.meter("m1"), database.meter("m2", own_pool=True)]
    _, key = new_key(meters[0], budget=10)
    threads = 6

    def attempt(i: int) -> int:
        try:
            meters[i % 2].reserve(key, 1, 1, "/v1/evaluate", f"r{i}", "same")
            return 200
        except APIError as exc:
            return exc.status

    outcomes = run_threads(threads, attempt)
    assert sorted(outcomes) == [200] + [409] * (threads - 1), outcomes
    totals = database.assert_consistent(key.prefix)
    assert (totals.used, totals.rows, totals.reserved) == (1, 1, 1)


# ----------------------------------------------------------------------------------------------- rate limits


def test_the_rate_limit_bucket_is_shared_by_two_replicas(database: Database):
    a, b = database.meter("a"), database.meter("b", own_pool=True)
    secret, described = a.create_key(10, rate_limit=2.0)  # 2 requests/s, a burst of 2
    a.authenticate(secret)
    b.authenticate(secret)
    error = error_of(lambda: a.authenticate(secret))
    assert (error.code, error.status, error.details) == (ErrorCode.RATE_LIMITED, 429, {"rate_limit": 2.0})
    assert error.headers["Retry-After"] == "1"  # whole seconds (RFC 9110): the 0.5 s wait rounded up
    error = error_of(lambda: b.authenticate(secret))  # the other replica sees the same empty bucket
    assert error.code == ErrorCode.RATE_LIMITED
    time.sleep(float(error.headers["Retry-After"]) + 0.05)  # a whole second refills the burst of 2
    b.authenticate(secret)
    b.authenticate(secret)
    assert error_of(lambda: a.authenticate(secret)).code == ErrorCode.RATE_LIMITED
    row = database.key_row(described.prefix)
    assert row.rate_tokens < 1.0 and row.rate_updated > 0 and row.used == 0  # rate limiting is not charging


def test_the_shared_bucket_holds_under_concurrency(database: Database):
    """Threads of two replicas hammer one key: the accepted requests stay within burst + rate x time."""
    rate, seconds = 5.0, size(1.5, 5.0)
    meters = [database.meter("a"), database.meter("b", own_pool=True)]
    secret, _ = meters[0].create_key(10, rate_limit=rate)
    accepted, refused = [], []
    lock = threading.Lock()

    def hammer(i: int, start: float) -> None:
        while time.monotonic() - start < seconds:
            try:
                meters[i % 2].authenticate(secret)
                with lock:
                    accepted.append(time.monotonic() - start)
            except APIError as exc:
                assert exc.code == ErrorCode.RATE_LIMITED and "Retry-After" in exc.headers
                with lock:
                    refused.append(exc)

    start = time.monotonic()
    run_threads(6, hammer, start)
    elapsed = time.monotonic() - start
    assert 1 <= len(accepted) <= max(1.0, rate) + rate * elapsed + 1, (len(accepted), elapsed)
    assert len(refused) > len(accepted)


# ----------------------------------------------------------------------------------------------- usage


def test_usage_reports_budgets_limits_and_recent_requests_newest_first(database: Database):
    meter = database.meter()
    expires = datetime.now(UTC).replace(microsecond=0) + timedelta(days=2)
    secret, described = meter.create_key(20, name="bob", token_budget=500, rate_limit=50.0, expires_at=expires)
    key = meter.authenticate(secret)
    meter.reserve(key, 2, 40, "/v1/evaluate", "first", None).settle(b"{}")
    meter.reserve(key, 1, 10, "/v1/layer_std", "second", None).refund(http_status=500)
    meter.reserve(key, 3, 60, "/v1/evaluate", "third", None)  # in flight

    usage = meter.usage(key)
    assert (usage.key_prefix, usage.name, usage.budget, usage.used, usage.remaining) == (
        described.prefix,
        "bob",
        20,
        5,
        15,
    )
    assert (usage.token_budget, usage.tokens_used, usage.tokens_remaining) == (500, 100, 400)
    assert usage.rate_limit == 50.0 and usage.expires_at == expires
    recent = [(r.request_id, r.endpoint, r.calls, r.tokens, r.status, r.http_status) for r in usage.recent]
    assert recent == [
        ("third", "/v1/evaluate", 3, 60, "reserved", None),
        ("second", "/v1/layer_std", 1, 10, "refunded", 500),
        ("first", "/v1/evaluate", 2, 40, "settled", 200),
    ]
    assert usage.recent[2].latency_ms is not None and all(r.created_at.tzinfo is not None for r in usage.recent)
    assert [r.request_id for r in meter.usage(key, recent=1).recent] == ["third"]

    plain_secret, _ = meter.create_key(7)
    plain = meter.usage(meter.authenticate(plain_secret))
    assert (plain.used, plain.remaining, plain.token_budget, plain.tokens_remaining, plain.rate_limit) == (
        0,
        7,
        None,
        None,
        None,
    )
    assert plain.expires_at is None and plain.recent == []
    assert "key_hash" not in usage.model_dump() and secret not in usage.model_dump_json()
    with database.sessions() as session:
        assert session.get(ApiKey, key.id).used == usage.used
