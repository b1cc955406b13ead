"""Projection work paid and bounded (issue 16 item 4), on SQLite and PostgreSQL.

* a projection that would outlast the request timeout ends with 504 within it, and is not charged;
* a candidate that could overflow once projected is rejected before any matrix is materialized, so a
  request that is not charged did no work;
* an error in the request found after the server did the work (here: NaN logits) is charged, and a retry
  with the same Idempotency-Key replays that error instead of buying the work again;
* SIGTERM ends `lmaas-server serve` in seconds even mid-request: the request in flight gets 503 and its
  reservation is refunded.
"""

from __future__ import annotations

import base64
import signal
import threading
import time

import httpx
import numpy as np

from lmaas_protocol import IDEMPOTENCY_HEADER
from tests.server.metering.conftest import Database, auth, one_candidate_body
from tests.server.support import assert_error
from tests.support.tiny_models import HIDDEN

# A [32000, 64 * 32]: 65M elements, several seconds to generate on a CPU.
BIG = {"seed": 3, "scale": 0.01, "dim": 32000, "shape": [64, HIDDEN]}


def f32(values) -> dict:
    array = np.asarray(values, dtype="<f4")
    return {"dtype": "float32", "shape": list(array.shape), "data": base64.b64encode(array.tobytes()).decode()}


def projected(spec: dict, fill: float = 0.01) -> dict:
    return {"soft_prompt": {"z": f32(np.full(spec["dim"], fill)), "projection": spec}}


def post(server, secret: str, body: dict, **headers: str) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/evaluate", json=body, headers={**auth(secret), **headers}, timeout=120)


def test_a_projection_past_the_deadline_is_504_within_the_timeout_and_not_charged(database: Database,
                                                                                  metered_server):  # fmt: skip
    with metered_server(database, request_timeout_s=0.5, max_projection_elements=1 << 27) as server:
        secret, described = server.meter.create_key(10)
        started = time.monotonic()
        response = post(server, secret, one_candidate_body(candidates=[projected(BIG)]))
        elapsed = time.monotonic() - started
        assert_error(response, 504, "timeout")
        assert elapsed < 5, f"answered after {elapsed:.1f} s; the whole projection takes several seconds"
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.refunded) == (0, 1)


def test_a_candidate_that_could_overflow_is_rejected_before_any_projection_is_materialized(database: Database,
                                                                                           metered_server):  # fmt: skip
    overflowing = {"seed": 7, "scale": 1e6, "dim": 8, "shape": [2, HIDDEN]}
    with metered_server(database, max_projection_elements=1 << 27) as server:
        secret, _ = server.meter.create_key(10)
        misses = server.engine.decoder.matrices.misses
        before = database.snapshot()
        response = post(server, secret, one_candidate_body(candidates=[projected(BIG), projected(overflowing, 1e33)]))
        error = assert_error(response, 422, "invalid_request", "candidates.1")
        assert "overflow" in error["message"]
        assert server.engine.decoder.matrices.misses == misses  # no matrix was generated
        assert database.snapshot() == before  # not even a ledger row: rejected before the reservation


def test_an_error_found_after_the_work_is_charged_and_replayed(database: Database, metered_server, monkeypatch):
    with metered_server(database) as server:
        real = server.engine.score

        def nan_logits(*args, **kwargs):
            return np.full_like(real(*args, **kwargs), np.nan)  # the forward passes ran; the logits are NaN

        monkeypatch.setattr(server.engine, "score", nan_logits)
        secret, described = server.meter.create_key(10)
        body = one_candidate_body(candidates=[{}, {}])
        first = post(server, secret, body, **{IDEMPOTENCY_HEADER: "nan-1"})
        assert_error(first, 422, "invalid_request", "candidates.0")
        assert "idempotent-replayed" not in first.headers
        totals = database.assert_consistent(described.prefix)
        assert (totals.used, totals.settled, totals.refunded) == (2, 2, 0)  # the work was done: charged
        (row,) = database.ledger(described.prefix)
        assert (row.status, row.http_status) == ("settled", 422)

        again = post(server, secret, body, **{IDEMPOTENCY_HEADER: "nan-1"})
        assert again.status_code == 422 and again.headers["idempotent-replayed"] == "true"
        assert again.content == first.content
        assert database.assert_consistent(described.prefix).used == 2  # not bought twice


def test_sigterm_ends_the_server_in_seconds_and_the_request_in_flight_gets_503(database: Database,
                                                                               server_processes):  # fmt: skip
    server = server_processes(database.url, "stopping", LMAAS_MAX_PROJECTION_ELEMENTS=str(1 << 28))
    server.start().wait_healthy()
    from lmaas_server.metering.keys import KeyStore

    secret, described = KeyStore(database.sessions).create_key(10)
    huge = {**BIG, "dim": 60000}  # 123M elements: longer than this test waits
    outcome: dict = {}
    thread = threading.Thread(
        target=lambda: outcome.update(response=post(server, secret, one_candidate_body(candidates=[projected(huge)])))
    )
    thread.start()
    deadline = time.monotonic() + 30
    while database.totals(described.prefix).reserved == 0:  # the request is being worked on (racy read: no check)
        assert time.monotonic() < deadline, server.logs()[-3000:]
        time.sleep(0.05)
    time.sleep(0.5)
    stopped = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    thread.join(timeout=30)
    assert_error(outcome["response"], 503, "shutting_down")
    server.process.wait(timeout=30)
    assert time.monotonic() - stopped < 8, f"exited {time.monotonic() - stopped:.1f} s after SIGTERM"
    totals = database.assert_consistent(described.prefix)
    if totals.reserved:  # the process ended before its refund committed: a restart of the replica refunds it
        server.start().wait_healthy()
        totals = database.assert_consistent(described.prefix)
    assert (totals.used, totals.reserved, totals.refunded) == (0, 0, 1)
