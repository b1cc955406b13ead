"""kill -9 under load, on SQLite and PostgreSQL: two `lmaas-server serve` processes (replicas "a" and "c")
share a database and are killed while requests are in flight; then

* no completed request lost its charge or was charged twice: every 200 a client received has its settled
  ledger row, and the key's `used` equals the settled calls plus what is still reserved;
* replica "a" restarted with the same LMAAS_REPLICA_ID refunds its own leftover reservations at start-up,
  and leaves those of "c" alone (they are neither its own nor stale);
* a new replica "b" with a small LMAAS_STALE_RESERVATION_S refunds the rows of "c" at start-up (older
  than that), so `used` equals the settled calls exactly;
* the interrupted requests, retried with their Idempotency-Key, are replayed when they had been settled
  and charged once when they had been refunded.

Requests are made slow by size (64 candidates x 16 examples with LMAAS_MAX_BATCH_TOKENS=64: ~0.5 s each),
so that several are in flight at the kill; the checks read the database directly.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field

import httpx

from lmaas_protocol import IDEMPOTENCY_HEADER
from tests.server.metering.conftest import Database, auth, one_candidate_body, run_threads, size, start_all

CANDIDATES, EXAMPLES = 64, 16
CLIENTS_PER_SERVER = size(3, 6)
SETTLED_BEFORE_KILL = size(4, 20)  # completed requests before the kill
IN_FLIGHT_AT_KILL = size(2, 3)  # reserved rows per replica at the kill (at least)
SLOW = {"LMAAS_MAX_BATCH_TOKENS": "64"}


def heavy_body() -> dict:
    texts = [f"example number {i} was fun to watch" for i in range(EXAMPLES)]
    return one_candidate_body(texts, candidates=[{"prompt_token_ids": [5 + c % 50, 6]} for c in range(CANDIDATES)])


@dataclass
class Attempt:
    request_id: str
    idempotency_key: str
    server: str
    status: int | None = None  # None: no response (the connection broke)
    body: dict | None = None


@dataclass
class Load:
    """Clients sending heavy evaluations until their server dies (or `stop` is set)."""

    urls: dict[str, str]
    secret: str
    stop: threading.Event = field(default_factory=threading.Event)
    attempts: list[Attempt] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def start(self) -> Load:
        for name, url in self.urls.items():
            for i in range(CLIENTS_PER_SERVER):
                thread = threading.Thread(target=self._client, args=(name, url, i), daemon=True)
                thread.start()
                self.threads.append(thread)
        return self

    def _client(self, name: str, url: str, i: int) -> None:
        body = heavy_body()
        with httpx.Client(base_url=url, headers=auth(self.secret), timeout=60) as http:
            while not self.stop.is_set():
                attempt = Attempt(f"{name}{i}-{uuid.uuid4().hex[:12]}", uuid.uuid4().hex, name)
                with self.lock:
                    self.attempts.append(attempt)
                headers = {"X-Request-ID": attempt.request_id, IDEMPOTENCY_HEADER: attempt.idempotency_key}
                try:
                    response = http.post("/v1/evaluate", json=body, headers=headers)
                except httpx.TransportError:
                    return  # the server is gone
                attempt.status, attempt.body = response.status_code, response.json()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
            assert not thread.is_alive()


def reserved_by_replica(db: Database, prefix: str) -> Counter:
    return Counter(row.replica for row in db.ledger(prefix) if row.status == "reserved")


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_kill_9_under_load_then_restart_loses_and_doubles_nothing(database: Database, server_processes):
    db = database
    a, c = server_processes(db.url, "a", **SLOW), server_processes(db.url, "c", **SLOW)
    start_all(a, c)
    secret, described = db.meter("test").create_key(10**7, name="crash")
    prefix = described.prefix
    load = Load({"a": a.url, "c": c.url}, secret).start()

    def ready() -> bool:
        settled = sum(1 for row in db.ledger(prefix) if row.status == "settled")
        reserved = reserved_by_replica(db, prefix)
        return settled >= SETTLED_BEFORE_KILL and min(reserved["a"], reserved["c"]) >= IN_FLIGHT_AT_KILL

    wait_for(ready, 120, "completed requests and requests in flight on both replicas")
    a.kill9()
    c.kill9()
    killed_at = time.monotonic()
    load.join()

    # ---- right after the crash: completed requests are settled, the rest is reserved (or never started)
    completed = [t for t in load.attempts if t.status == 200]
    assert all(t.status in (200, None) for t in load.attempts), Counter(t.status for t in load.attempts)
    interrupted = [t for t in load.attempts if t.status is None]
    rows = {row.request_id: row for row in db.ledger(prefix)}
    assert len(completed) >= SETTLED_BEFORE_KILL // 2
    for attempt in completed:
        row = rows[attempt.request_id]
        assert (row.status, row.calls, row.idempotency_key) == ("settled", CANDIDATES, attempt.idempotency_key)
        assert attempt.body["usage"]["calls"] == CANDIDATES
    assert {row.status for row in rows.values()} <= {"settled", "reserved"}  # nothing refunded yet
    assert set(rows) <= {t.request_id for t in load.attempts}  # no row without a request behind it
    totals = db.assert_consistent(prefix)  # used == settled + reserved: nothing lost, nothing doubled
    left = reserved_by_replica(db, prefix)
    assert left["a"] >= 1 and left["c"] >= 1, f"the kill caught nothing in flight: {left}"
    assert totals.reserved == (left["a"] + left["c"]) * CANDIDATES
    print(f"[{db.backend}] at the kill: {len(completed)} completed, {len(interrupted)} interrupted, "
          f"in flight a={left['a']} c={left['c']}, used={totals.used} calls")  # fmt: skip

    # ---- "a" restarts with the same replica id: refunds its own leftovers, not those of "c"
    a2 = server_processes(db.url, "a")
    start_all(a2)
    after = {row.request_id: row.status for row in db.ledger(prefix)}
    for request_id, row in rows.items():
        if row.status == "reserved":
            assert after[request_id] == ("refunded" if row.replica == "a" else "reserved"), (request_id, row.replica)
        else:
            assert after[request_id] == "settled"
    totals = db.assert_consistent(prefix)
    assert totals.reserved == left["c"] * CANDIDATES and totals.refunded == left["a"] * CANDIDATES
    assert f"refunded {left['a']} unfinished reservation(s)" in a2.logs()

    # ---- a new replica "b" with a small stale threshold refunds the rows of "c" (older than 1 s)
    time.sleep(max(0.0, killed_at + 1.1 - time.monotonic()))  # (a2's start-up took longer already)
    b = server_processes(db.url, "b", LMAAS_STALE_RESERVATION_S="1")
    start_all(b)
    final = {row.request_id: row.status for row in db.ledger(prefix)}
    assert all(final[r] == "refunded" for r, row in rows.items() if row.status == "reserved")
    totals = db.assert_consistent(prefix)
    assert totals.reserved == 0 and totals.used == totals.settled
    assert totals.tokens_used == totals.settled_tokens
    assert totals.settled == sum(1 for s in final.values() if s == "settled") * CANDIDATES

    # ---- the interrupted requests retried with their Idempotency-Key: replayed if settled, else charged once
    body = heavy_body()

    def retry(n: int) -> None:  # all at once, spread over both replicas
        attempt = interrupted[n]
        headers = {**auth(secret), IDEMPOTENCY_HEADER: attempt.idempotency_key}
        response = httpx.post(f"{(a2.url, b.url)[n % 2]}/v1/evaluate", json=body, headers=headers, timeout=120)
        assert response.status_code == 200, response.text
        replayed = response.headers.get("idempotent-replayed") == "true"
        assert replayed == (final.get(attempt.request_id) == "settled"), attempt
        if replayed:
            assert response.json()["request_id"] == attempt.request_id

    if interrupted:
        run_threads(len(interrupted), retry)
    settled_keys = Counter(row.idempotency_key for row in db.ledger(prefix) if row.status == "settled")
    assert settled_keys == Counter({t.idempotency_key: 1 for t in completed + interrupted})  # each charged once
    totals = db.assert_consistent(prefix)
    assert totals.reserved == 0 and totals.used == totals.settled == len(settled_keys) * CANDIDATES
    for server in (a2, b):
        assert server.process.poll() is None, server.logs()[-2000:]
