"""Metering fixtures: fresh databases (SQLite files and PostgreSQL databases), metered in-process servers,
real `lmaas-server serve` processes, and ledger bookkeeping helpers.

Every database-backed test runs on both backends. A PostgreSQL variant gets a database of its own
(`CREATE DATABASE lmaas_test_<random>` through the `test` database, dropped afterwards), so parallel and
repeated runs never see each other's keys or ledger rows. When PostgreSQL cannot be reached the
PostgreSQL variants fail with the reason (they are never skipped): set LMAAS_TEST_POSTGRES_URL to point
them elsewhere.

CI-sized by default; LMAAS_FULL_METERING_TESTS=1 runs the full-size variants (more clients, requests,
fuzz cases and repetitions).
"""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from pydantic import SecretStr

from lmaas_server.metering.db import make_engine, migrate, normalize_url, session_factory
from lmaas_server.metering.meter import Meter
from lmaas_server.metering.models import ApiKey, LedgerEntry
from tests.conftest import LiveServer, free_port

FULL = os.environ.get("LMAAS_FULL_METERING_TESTS", "").strip() not in ("", "0", "false", "no")
PG_ADMIN_URL = os.environ.get("LMAAS_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ("sqlite", "postgresql")
ADMIN_TOKEN = "adm-" + "t0ken" * 6
BIN = Path(sys.executable).parent
SERVER_STARTUP_S = 180
CAUSAL_TEMPLATE = "{prompt}Review: {text_a}\nSentiment:{mask}"
VERBALIZER = [[5], [6]]  # two token ids of the tiny llama's vocabulary


def size(ci, full):
    """The CI-sized value, or the full-size one under LMAAS_FULL_METERING_TESTS=1."""
    return full if FULL else ci


# ----------------------------------------------------------------------------------------------- databases


@dataclass(frozen=True)
class Totals:
    budget: int
    used: int
    token_budget: int | None
    tokens_used: int
    rows: int
    settled: int  # calls of settled rows
    reserved: int
    refunded: int
    settled_tokens: int
    reserved_tokens: int
    statuses: dict[str, int]


class Database:
    """A fresh metering database (migrated), with direct access to its tables for the checks."""

    def __init__(self, backend: str, url: str, pg_name: str | None = None):
        self.backend = backend
        self.url = url  # as LMAAS_DATABASE_URL takes it
        self.pg_name = pg_name
        self.engine = make_engine(url)
        migrate(self.engine)
        self.sessions = session_factory(self.engine)
        self._extra_engines: list[sa.Engine] = []

    def __repr__(self) -> str:
        return f"Database({self.backend}, {self.url})"

    def meter(self, replica: str = "test", stale_after_s: float = 900.0, own_pool: bool = False) -> Meter:
        """A Meter on this database; `own_pool` gives it its own engine (as another replica would have)."""
        sessions = self.sessions
        if own_pool:
            engine = make_engine(self.url)
            self._extra_engines.append(engine)
            sessions = session_factory(engine)
        return Meter(sessions, replica, stale_after_s)

    def key_row(self, prefix: str) -> ApiKey:
        with self.sessions() as session:
            return session.scalar(sa.select(ApiKey).where(ApiKey.prefix == prefix))

    def ledger(self, prefix: str | None = None) -> list[LedgerEntry]:
        with self.sessions() as session:
            query = sa.select(LedgerEntry).order_by(LedgerEntry.id)
            if prefix is not None:
                query = query.join(ApiKey, ApiKey.id == LedgerEntry.key_id).where(ApiKey.prefix == prefix)
            return list(session.scalars(query))

    def totals(self, prefix: str) -> Totals:
        row = self.key_row(prefix)
        entries = self.ledger(prefix)
        by = {status: [e for e in entries if e.status == status] for status in ("settled", "reserved", "refunded")}
        return Totals(
            budget=row.budget,
            used=row.used,
            token_budget=row.token_budget,
            tokens_used=row.tokens_used,
            rows=len(entries),
            settled=sum(e.calls for e in by["settled"]),
            reserved=sum(e.calls for e in by["reserved"]),
            refunded=sum(e.calls for e in by["refunded"]),
            settled_tokens=sum(e.tokens for e in by["settled"]),
            reserved_tokens=sum(e.tokens for e in by["reserved"]),
            statuses={status: len(rows) for status, rows in by.items() if rows},
        )

    def assert_consistent(self, prefix: str) -> Totals:
        """The key's counters equal what its ledger holds: settled plus still-reserved calls and tokens."""
        totals = self.totals(prefix)
        assert totals.used == totals.settled + totals.reserved, totals
        assert totals.tokens_used == totals.settled_tokens + totals.reserved_tokens, totals
        assert set(totals.statuses) <= {"settled", "reserved", "refunded"}, totals
        return totals

    def snapshot(self) -> tuple:
        """Every key's counters and every ledger row's state: equal before and after an uncharged request."""
        with self.sessions() as session:
            keys = session.execute(
                sa.select(ApiKey.prefix, ApiKey.used, ApiKey.tokens_used, ApiKey.budget).order_by(ApiKey.id)
            ).all()
            rows = session.execute(sa.select(LedgerEntry.id, LedgerEntry.status).order_by(LedgerEntry.id)).all()
        return tuple(map(tuple, keys)), tuple(map(tuple, rows))

    def backdate(self, seconds: float, **where) -> int:
        """Move ledger rows' created_at into the past (matching `where`, e.g. replica="a")."""
        with self.sessions.begin() as session:
            rows = session.scalars(sa.select(LedgerEntry).filter_by(**where)).all()
            for row in rows:
                row.created_at = row.created_at - timedelta(seconds=seconds)
            return len(rows)

    def dispose(self) -> None:
        for engine in [self.engine, *self._extra_engines]:
            engine.dispose()


def _pg_admin() -> sa.Engine:
    return sa.create_engine(normalize_url(PG_ADMIN_URL), isolation_level="AUTOCOMMIT", poolclass=sa.pool.NullPool)


def _pg_failure(exc: Exception) -> None:
    pytest.fail(
        f"PostgreSQL is unreachable at {PG_ADMIN_URL} ({type(exc).__name__}: {str(exc).strip()[:300]}). The "
        "PostgreSQL variants of the metering tests need it: start it or set LMAAS_TEST_POSTGRES_URL.",
        pytrace=False,
    )


def _pg_url(name: str) -> str:
    url = sa.make_url(normalize_url(PG_ADMIN_URL)).set(database=name)
    return url.render_as_string(hide_password=False).replace("postgresql+psycopg://", "postgresql://", 1)


@pytest.fixture(scope="session")
def pg_template(request) -> Iterator[str]:
    """A migrated PostgreSQL database that per-test databases are copied from (faster than migrating each)."""
    name = f"lmaas_test_template_{secrets.token_hex(6)}"
    try:
        admin = _pg_admin()
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
    except sa.exc.OperationalError as exc:
        _pg_failure(exc)
    try:
        engine = make_engine(_pg_url(name))
        migrate(engine)
        engine.dispose()
        yield name
    finally:
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def fresh_database(backend: str, folder: Path, request) -> Iterator[Database]:
    """A new, migrated, empty database on `backend`; removed afterwards."""
    if backend == "sqlite":
        folder.mkdir(parents=True, exist_ok=True)
        database = Database(backend, f"sqlite:///{folder / f'metering-{secrets.token_hex(4)}.db'}")
        try:
            yield database
        finally:
            database.dispose()
        return
    template = request.getfixturevalue("pg_template")
    name = f"lmaas_test_{secrets.token_hex(6)}"
    admin = _pg_admin()
    try:
        with admin.connect() as connection:
            connection.execute(sa.text(f'CREATE DATABASE "{name}" TEMPLATE "{template}"'))
    except sa.exc.OperationalError as exc:
        _pg_failure(exc)
    database = None
    try:
        database = Database(backend, _pg_url(name), pg_name=name)
        yield database
    finally:
        if database is not None:
            database.dispose()
        with admin.connect() as connection:
            connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(params=BACKENDS)
def database(request, tmp_path) -> Iterator[Database]:
    """A fresh database per test, on each backend."""
    with fresh_database(request.param, tmp_path / "db", request) as db:
        yield db


@pytest.fixture(scope="module", params=BACKENDS)
def module_database(request, tmp_path_factory) -> Iterator[Database]:
    """A fresh database per test module and backend (tests in it use keys of their own)."""
    with fresh_database(request.param, tmp_path_factory.mktemp("db"), request) as db:
        yield db


@pytest.fixture
def postgres_database(request, tmp_path) -> Iterator[Database]:
    with fresh_database("postgresql", tmp_path / "db", request) as db:
        yield db


# ----------------------------------------------------------------------------------------------- servers


class MeteredServer(LiveServer):
    """An in-process uvicorn server with API keys required, on a shared tiny-model engine and `meter`."""

    def __init__(self, engine, meter: Meter, db: Database, admin_token: str | None = ADMIN_TOKEN, **settings):
        from lmaas_server.main import create_app

        update = {"require_api_key": True, "database_url": db.url, "replica_id": meter.replica, **settings}
        update["admin_token"] = SecretStr(admin_token) if admin_token is not None else None
        self.engine = engine
        self.meter = meter
        self.db = db
        self.app = create_app(engine.settings.model_copy(update=update), engine=engine, meter=meter)
        super().__init__(self.app)


@pytest.fixture
def metered_server(engines):
    """Factory: `with metered_server(db, kind="llama", replica=..., **engine_settings) as server:`."""

    def start(
        db: Database, kind: str = "llama", replica: str | None = None, admin_token=ADMIN_TOKEN, **engine_settings
    ):
        meter = db.meter(replica or f"inproc-{secrets.token_hex(3)}")
        return MeteredServer(engines(kind, **engine_settings), meter, db, admin_token=admin_token)

    return start


def server_env(db_url: str, replica: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LMAAS_")}
    env.update(
        LMAAS_DATABASE_URL=db_url,
        LMAAS_REPLICA_ID=replica,
        LMAAS_DEVICE="cpu",
        LMAAS_DTYPE="float32",  # as every test server (tests/conftest.py)
        LMAAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


# `lmaas-server` with SQLAlchemy's statement log on (SQL and its parameters): SQLAlchemy keeps its loggers at
# WARNING whatever the root level, so `--log-level debug` alone never shows what reaches the database.
SQL_LOGGING_SERVER = (
    "import logging, sys; logging.getLogger('sqlalchemy.engine').setLevel(logging.INFO); "
    "from lmaas_server.cli import app; sys.exit(app())"
)


class ServerProcess:
    """`lmaas-server serve --model <tiny folder>` in its own process on a free port, logs to a file."""

    def __init__(self, model_dir: Path, db_url: str, replica: str, log_path: Path, log_level: str = "warning",
                 sql_log: bool = False, **env: str):  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.replica = replica
        self.log_path = log_path
        program = [sys.executable, "-c", SQL_LOGGING_SERVER] if sql_log else [str(BIN / "lmaas-server")]
        self.command = [*program, "serve", "--model", str(model_dir), "--port", str(self.port),
                        "--device", "cpu", "--log-level", log_level]  # fmt: skip
        self.env = server_env(db_url, replica, **env)
        self.process: subprocess.Popen | None = None

    def start(self) -> ServerProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = self.log_path.open("ab")
        # cwd: a folder of its own, so that no stray .env file configures the server
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                        cwd=self.log_path.parent, start_new_session=True)  # fmt: skip
        log.close()
        return self

    def wait_healthy(self, timeout: float = SERVER_STARTUP_S) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(
                    f"server {self.replica} exited with {self.process.returncode}:\n{self.logs()[-3000:]}"
                )
            try:
                if httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"server {self.replica} did not become healthy:\n{self.logs()[-3000:]}")
            time.sleep(0.1)

    def kill9(self) -> None:
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def server_processes(tiny_model_dirs, tmp_path):
    """Factory of ServerProcess objects on the tiny llama (stopped at the end of the test)."""
    started: list[ServerProcess] = []

    def make(db_url: str, replica: str, log_level: str = "warning", **env: str) -> ServerProcess:
        server = ServerProcess(tiny_model_dirs["llama"], db_url, replica, tmp_path / "logs" / f"{replica}-{len(started)}.log",
                               log_level, **env)  # fmt: skip
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


def start_all(*servers: ServerProcess) -> None:
    """Start servers together (start-up is mostly imports: overlapping them saves time) and wait for all."""
    for server in servers:
        server.start()
    for server in servers:
        server.wait_healthy()


# ----------------------------------------------------------------------------------------------- requests


def auth(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def admin_auth(token: str = ADMIN_TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def one_candidate_body(texts=("fun to watch", "a bad film , boring"), candidates=None) -> dict:
    return {
        "template": CAUSAL_TEMPLATE,
        "examples": [{"text_a": t, "label": i % 2} for i, t in enumerate(texts)],
        "verbalizer": VERBALIZER,
        "candidates": candidates if candidates is not None else [{}],
    }


def run_threads(count: int, target, *args) -> list:
    """Run `target(i, *args)` in `count` threads started together; returns their results (re-raises)."""
    results: list = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = target(i, *args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results
