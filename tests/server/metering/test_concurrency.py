"""Concurrency and idempotency, on SQLite and PostgreSQL: 50 clients racing for a budget of 100 calls (one
in-process server, and two `lmaas-server serve` processes sharing one PostgreSQL database), Idempotency-Key
retries charged once (replayed byte for byte; 409 while the first is in flight; a refunded attempt frees
the key), and the real client retrying after a dropped connection."""

from __future__ import annotations

import threading
import uuid
from collections import Counter

import httpx
import pytest

import lmaas_client.client as client_module
from lmaas_client import LMaaSClient
from lmaas_protocol import IDEMPOTENCY_HEADER, Candidate, EvaluateRequest, Example, InputsSpec
from tests.conftest import LiveServer
from tests.server.metering.conftest import (
    CAUSAL_TEMPLATE,
    VERBALIZER,
    Database,
    auth,
    one_candidate_body,
    run_threads,
    size,
    start_all,
)
from tests.server.test_api import assert_error

CLIENTS = 50
BUDGET = 100
REQUESTS_PER_CLIENT = size(4, 10)
ROUNDS = size(1, 3)  # full size: repeated on fresh keys


def race(urls: list[str], secret: str) -> tuple[Counter, dict[str, dict], list[dict]]:
    """CLIENTS threads (each with its own connection), spread over `urls`, each sending REQUESTS_PER_CLIENT
    one-candidate evaluations. Returns the status counts, the 200 bodies by request id, and the 402 errors."""
    body = one_candidate_body()

    def client(i: int) -> list[tuple[int, str, dict]]:
        seen = []
        with httpx.Client(base_url=urls[i % len(urls)], headers=auth(secret), timeout=120) as http:
            for j in range(REQUESTS_PER_CLIENT):
                request_id = f"c{i}-r{j}-{uuid.uuid4().hex[:8]}"
                response = http.post("/v1/evaluate", json=body, headers={"X-Request-ID": request_id})
                seen.append((response.status_code, request_id, response.json()))
        return seen

    results = [item for per_client in run_threads(CLIENTS, client) for item in per_client]
    statuses = Counter(status for status, _, _ in results)
    successes = {request_id: body for status, request_id, body in results if status == 200}
    refusals = [body for status, _, body in results if status == 402]
    return statuses, successes, refusals


def check_race(db: Database, prefix: str, statuses: Counter, successes: dict, refusals: list) -> None:
    total = CLIENTS * REQUESTS_PER_CLIENT
    assert statuses == Counter({200: BUDGET, 402: total - BUDGET}), statuses
    for body in successes.values():  # charged and evaluated: one scored candidate each
        assert body["usage"]["calls"] == 1 and len(body["results"]) == 1, body
        assert body["results"][0]["loss"] > 0 and body["results"][0]["logits"]["shape"] == [2, 2]
    for error in refusals:
        assert error["error"]["code"] == "budget_exhausted"
        assert error["error"]["details"] == {"requested": 1, "remaining": 0}
    totals = db.assert_consistent(prefix)
    assert (totals.used, totals.settled, totals.reserved, totals.refunded) == (BUDGET, BUDGET, 0, 0), totals
    settled = {row.request_id for row in db.ledger(prefix) if row.status == "settled"}
    assert settled == set(successes)  # every 200 is one settled row, and nothing else was charged
    remaining = sorted(body["usage"]["budget_remaining"] for body in successes.values())
    assert remaining == list(range(BUDGET))  # each reservation saw its own place in the budget


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_50_clients_against_a_budget_of_100_on_one_server(database: Database, metered_server, round_):
    with metered_server(database) as server:
        secret, described = server.meter.create_key(BUDGET, name=f"race-{round_}")
        statuses, successes, refusals = race([server.url], secret)
    check_race(database, described.prefix, statuses, successes, refusals)


def test_50_clients_over_two_server_processes_sharing_one_postgres_database(postgres_database: Database,
                                                                             server_processes):  # fmt: skip
    db = postgres_database
    servers = [server_processes(db.url, f"replica-{n}") for n in (1, 2)]
    start_all(*servers)
    for round_ in range(ROUNDS):
        secret, described = db.meter().create_key(BUDGET, name=f"two-processes-{round_}")
        statuses, successes, refusals = race([s.url for s in servers], secret)
        check_race(db, described.prefix, statuses, successes, refusals)
        by_replica = Counter(row.replica for row in db.ledger(described.prefix))
        assert set(by_replica) == {"replica-1", "replica-2"}, by_replica  # both replicas charged the one key
    for server in servers:
        assert server.process.poll() is None, server.logs()[-2000:]


# ----------------------------------------------------------------------------------------------- idempotency


def post(server, secret: str, idempotency_key: str | None, body=None, request_id: str | None = None) -> httpx.Response:
    headers = auth(secret)
    if idempotency_key is not None:
        headers[IDEMPOTENCY_HEADER] = idempotency_key
    if request_id is not None:
        headers["X-Request-ID"] = request_id
    return httpx.post(f"{server.url}/v1/evaluate", json=body or one_candidate_body(), headers=headers, timeout=60)


def test_a_retry_with_the_same_idempotency_key_is_charged_once_and_replayed(database: Database, metered_server):
    with metered_server(database) as server:
        secret, described = server.meter.create_key(10)
        first = post(server, secret, "retry-1", request_id="first-attempt")
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers
        for attempt in range(3):
            again = post(server, secret, "retry-1", request_id=f"retry-{attempt}")
            assert again.status_code == 200
            assert again.headers["idempotent-replayed"] == "true"
            assert again.content == first.content  # the identical body, request id of the first included
            assert again.headers["content-type"] == "application/json"
        assert database.assert_consistent(described.prefix).used == 1

        other = post(server, secret, "retry-2")
        assert other.status_code == 200 and "idempotent-replayed" not in other.headers
        assert other.json()["request_id"] != first.json()["request_id"]
        plain = post(server, secret, None)
        assert plain.status_code == 200 and "idempotent-replayed" not in plain.headers
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.rows) == (3, 3)
        usage = httpx.get(f"{server.url}/v1/usage", headers=auth(secret)).json()
        assert usage["used"] == 3 and [r["request_id"] for r in usage["recent"]][-1] == "first-attempt"

        other_secret, other_key = server.meter.create_key(10)  # the same Idempotency-Key under another API key
        foreign = post(server, other_secret, "retry-1")
        assert foreign.status_code == 200 and "idempotent-replayed" not in foreign.headers
        assert database.assert_consistent(other_key.prefix).used == 1
        assert database.assert_consistent(described.prefix).used == 3


@pytest.fixture
def gated_forward(engines, monkeypatch):
    """The tiny llama's forward pass waits for `gate` (set it to let requests finish)."""
    engine = engines("llama")
    gate, entered = threading.Event(), threading.Event()
    real = engine.forward.run

    def slow(batch):
        entered.set()
        assert gate.wait(60), "the test never opened the gate"
        return real(batch)

    monkeypatch.setattr(engine.forward, "run", slow)
    yield gate, entered
    gate.set()


def test_a_retry_while_the_first_is_in_flight_gets_409_and_nothing_is_charged_twice(database, metered_server,
                                                                                     gated_forward):  # fmt: skip
    gate, entered = gated_forward
    with metered_server(database) as server:
        secret, described = server.meter.create_key(10)
        first: dict = {}
        thread = threading.Thread(target=lambda: first.update(response=post(server, secret, "slow-1")))
        thread.start()
        try:
            assert entered.wait(30), "the first request never reached the forward pass"
            assert database.assert_consistent(described.prefix).reserved == 1
            for _ in range(2):
                conflict = post(server, secret, "slow-1")
                error = assert_error(conflict, 409, "conflict")
                assert conflict.headers["retry-after"] == "1"
                assert "in flight" in error["message"]
            assert database.assert_consistent(described.prefix).used == 1
        finally:
            gate.set()
            thread.join(timeout=60)
        assert first["response"].status_code == 200, first["response"].text
        replay = post(server, secret, "slow-1")
        assert replay.headers["idempotent-replayed"] == "true" and replay.content == first["response"].content
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.settled, totals.rows) == (1, 1, 1)


def test_a_failed_attempt_is_refunded_and_its_retry_is_charged_once(database, metered_server, engines, monkeypatch):
    engine = engines("llama")
    real, failures = engine.forward.run, [1]

    def flaky(batch):
        if failures:
            failures.pop()
            raise RuntimeError("simulated device failure")
        return real(batch)

    monkeypatch.setattr(engine.forward, "run", flaky)
    with metered_server(database) as server:
        secret, described = server.meter.create_key(10)
        failed = post(server, secret, "flaky-1")
        assert_error(failed, 500, "internal_error")
        assert database.assert_consistent(described.prefix).used == 0
        retried = post(server, secret, "flaky-1")
        assert retried.status_code == 200 and "idempotent-replayed" not in retried.headers
        replay = post(server, secret, "flaky-1")
        assert replay.headers["idempotent-replayed"] == "true" and replay.content == retried.content
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.settled, totals.refunded) == (1, 1, 1)
        assert totals.statuses == {"settled": 1, "refunded": 1}


def test_a_retried_layer_std_with_the_same_idempotency_key_is_replayed(database, metered_server):
    """(Found a bug: /v1/layer_std recorded the Idempotency-Key but never replayed, so a retry of a completed
    request got 409 'still in flight; retry' forever.)"""
    with metered_server(database) as server:
        secret, described = server.meter.create_key(10)
        spec = {key: one_candidate_body()[key] for key in ("template", "examples", "verbalizer")}
        handle = httpx.post(f"{server.url}/v1/inputs", json=spec, headers=auth(secret)).json()["handle"]
        headers = {**auth(secret), IDEMPOTENCY_HEADER: "layer-1"}
        first = httpx.post(f"{server.url}/v1/layer_std", json={"inputs": handle}, headers=headers)
        assert first.status_code == 200 and "idempotent-replayed" not in first.headers, first.text
        for _ in range(2):
            again = httpx.post(f"{server.url}/v1/layer_std", json={"inputs": handle}, headers=headers)
            assert again.status_code == 200, again.text
            assert again.headers["idempotent-replayed"] == "true" and again.content == first.content
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.settled, totals.rows) == (1, 1, 1)


def test_an_idempotency_key_reused_on_another_endpoint_is_422_and_not_charged(database, metered_server):
    """A key's stored response belongs to one endpoint: replaying a layer_std body as an evaluate response (or
    the other way round) would hand the client the wrong document."""
    with metered_server(database) as server:
        secret, described = server.meter.create_key(10)
        spec = {key: one_candidate_body()[key] for key in ("template", "examples", "verbalizer")}
        handle = httpx.post(f"{server.url}/v1/inputs", json=spec, headers=auth(secret)).json()["handle"]
        headers = {**auth(secret), IDEMPOTENCY_HEADER: "shared"}
        assert httpx.post(f"{server.url}/v1/layer_std", json={"inputs": handle}, headers=headers).status_code == 200
        assert post(server, secret, "evaluated").status_code == 200
        before = database.snapshot()
        error = assert_error(post(server, secret, "shared"), 422, "invalid_request", "header.Idempotency-Key")
        assert "/v1/layer_std" in error["message"]
        reused = httpx.post(f"{server.url}/v1/layer_std", json={"inputs": handle},
                            headers={**auth(secret), IDEMPOTENCY_HEADER: "evaluated"})  # fmt: skip
        assert "/v1/evaluate" in assert_error(reused, 422, "invalid_request", "header.Idempotency-Key")["message"]
        assert database.snapshot() == before
        assert database.assert_consistent(described.prefix).used == 2


# ----------------------------------------------------------------------------------------------- the real client


class DropFirstResponse:
    """ASGI front: lets the first evaluate request through to the real app (so it is charged), throws the
    app's response away and hangs up mid-body; everything after that passes through untouched."""

    def __init__(self, inner, path: str = "/v1/evaluate"):
        self.inner = inner
        self.path = path
        self.dropped: list[str] = []  # Idempotency-Keys of the requests whose response was lost
        self.seen: list[str | None] = []

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] != self.path:
            await self.inner(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        self.seen.append(headers.get(IDEMPOTENCY_HEADER.lower()))
        if self.dropped:
            await self.inner(scope, receive, send)
            return
        self.dropped.append(headers.get(IDEMPOTENCY_HEADER.lower()))
        statuses = []

        async def swallow(message) -> None:
            if message["type"] == "http.response.start":
                statuses.append(message["status"])

        await self.inner(scope, receive, swallow)
        assert statuses == [200]
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b'{"requ', "more_body": True})
        # returning without finishing the body makes uvicorn close the connection


def test_the_real_client_retrying_after_a_dropped_connection_is_charged_once(database, metered_server, monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.05)
    metered = metered_server(database)
    front = DropFirstResponse(metered.app)
    with LiveServer(front) as server:
        secret, described = metered.meter.create_key(10)
        request = EvaluateRequest(
            template=CAUSAL_TEMPLATE,
            examples=[Example(text_a="fun to watch", label=1), Example(text_a="a bad film", label=0)],
            verbalizer=VERBALIZER,
            candidates=[Candidate(), Candidate(prompt_token_ids=[5, 6])],
        )
        with LMaaSClient(server.url, api_key=secret, max_retries=3) as client:
            response = client.evaluate(request)
            assert response.usage.calls == 2 and len(response.results) == 2
            assert len(front.dropped) == 1 and front.seen == [front.dropped[0]] * 2  # retried with the same key
            totals = database.assert_consistent(described.prefix)
            assert (totals.used, totals.settled, totals.rows) == (2, 2, 1)
            (row,) = database.ledger(described.prefix)
            assert row.idempotency_key == front.dropped[0] and row.request_id == response.request_id
            again = client.evaluate(request)  # a new evaluation: a new key, charged again
            assert again.request_id != response.request_id
        assert database.assert_consistent(described.prefix).used == 4


def test_the_real_clients_layer_std_retried_after_a_dropped_connection_is_charged_once(database, metered_server,
                                                                                      monkeypatch):  # fmt: skip
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.01)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.05)
    metered = metered_server(database)
    front = DropFirstResponse(metered.app, "/v1/layer_std")
    with LiveServer(front) as server:
        secret, described = metered.meter.create_key(10)
        spec = InputsSpec(template=CAUSAL_TEMPLATE, examples=[Example(text_a="fun to watch", label=1)],
                          verbalizer=VERBALIZER)  # fmt: skip
        with LMaaSClient(server.url, api_key=secret, max_retries=3) as client:
            handle = client.register_inputs(spec).handle
            measured = client.layer_std(handle)
            assert len(measured.layer_std) > 0
            assert len(front.dropped) == 1 and front.seen == [front.dropped[0]] * 2  # retried with the same key
            assert database.assert_consistent(described.prefix).used == 1
