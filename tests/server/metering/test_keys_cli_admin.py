"""Key administration: the `lmaas-server keys` CLI and the /v1/admin HTTP API, against a real
`lmaas-server serve` process on the same SQLite database (run at DEBUG level, with SQLAlchemy's statement
log on); its logs never contain a
key or a prompt tensor, and its Prometheus /metrics page carries the metering metrics and no key material.
Then the admin API in-process on both databases, with the bugs found in it, and concurrent first-time
schema migrations (a server and the CLI starting together on a new database)."""

from __future__ import annotations

import base64
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone

import httpx
import numpy as np
import pytest
import sqlalchemy as sa

from lmaas_server.metering.db import normalize_url
from lmaas_server.metering.meter import hash_key
from tests.server.metering.conftest import (
    ADMIN_TOKEN,
    BIN,
    Database,
    ServerProcess,
    _pg_admin,
    _pg_url,
    admin_auth,
    auth,
    one_candidate_body,
    server_env,
    size,
)
from tests.server.test_api import assert_error, non_finite
from tests.support.tiny_models import HIDDEN

KEY = re.compile(r"^(lmaas_[A-Za-z0-9_-]{8})_[A-Za-z0-9_-]{43}$")
CLI_TIMEOUT_S = 180


def random_part(secret: str) -> str:
    """A key's 43 random characters (they may contain "_" themselves); other secrets whole."""
    return secret[-43:] if KEY.match(secret) else secret


def cli(env: dict[str, str], *args: str) -> subprocess.Popen:
    return subprocess.Popen([str(BIN / "lmaas-server"), "keys", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def finish(process: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=CLI_TIMEOUT_S)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def run_cli(env, *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess]:
    """Run CLI commands at the same time (each start imports torch: a few seconds)."""
    return [finish(process) for process in [cli(env, *command) for command in commands]]


@dataclass
class Deployment:
    db: Database
    server: ServerProcess
    env: dict[str, str]
    created: dict[str, subprocess.CompletedProcess]
    budgets: dict[str, int]
    secrets: set[str] = field(default_factory=set)  # every secret seen in this module: never in the logs

    def secret(self, name: str) -> str:
        return self.created[name].stdout.strip().splitlines()[-1]

    def prefix(self, name: str) -> str:
        return KEY.match(self.secret(name)).group(1)

    def post(self, path: str, secret: str, headers=None, **kwargs) -> httpx.Response:
        return httpx.post(f"{self.server.url}{path}", headers={**auth(secret), **(headers or {})}, timeout=60, **kwargs)

    def get(self, path: str, headers=None) -> httpx.Response:
        return httpx.get(f"{self.server.url}{path}", headers=headers or {}, timeout=60)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory, tiny_model_dirs):
    """A server process (DEBUG logs, admin API on) and keys created with the CLI while it starts."""
    folder = tmp_path_factory.mktemp("keys-cli")
    db = Database("sqlite", f"sqlite:///{folder / 'lmaas.db'}")  # migrated here (see the race test below)
    server = ServerProcess(tiny_model_dirs["llama"], db.url, "keys-replica", folder / "server.log", "debug",
                           sql_log=True, LMAAS_ADMIN_TOKEN=ADMIN_TOKEN)  # fmt: skip
    env = server_env(db.url, "cli")
    budgets = {"alice": 50, "bob": 2, "carol": 5}  # alice pays for the later tests of this module
    server.start()
    try:
        processes = {name: cli(env, "create", "--budget", str(b), "--name", name) for name, b in budgets.items()}
        created = {name: finish(process) for name, process in processes.items()}
        server.wait_healthy()
        deployment = Deployment(db, server, env, created, budgets)
        deployment.secrets.update(deployment.secret(name) for name in created)
        yield deployment
    finally:
        server.stop()
        db.dispose()


def test_keys_create_prints_the_key_alone_on_its_last_line(deployment: Deployment):
    for name, result in deployment.created.items():
        assert result.returncode == 0, result.stderr
        assert len(result.stdout.splitlines()) == 1  # the key alone: `KEY=$(lmaas-server keys create ...)`
        secret = deployment.secret(name)
        match = KEY.match(secret)
        assert match, secret
        prefix = match.group(1)
        assert f"created {prefix} ({name}): budget {deployment.budgets[name]} calls" in result.stderr
        assert secret not in result.stderr
        row = deployment.db.key_row(prefix)
        assert (row.name, row.budget, row.used, row.key_hash) == (name, deployment.budgets[name], 0, hash_key(secret))
    assert len({deployment.secret(name) for name in deployment.created}) == 3


def test_topup_and_revoke_with_the_cli_while_the_server_runs(deployment: Deployment):
    bob, carol = deployment.secret("bob"), deployment.secret("carol")
    body = one_candidate_body()
    for _ in range(2):
        assert deployment.post("/v1/evaluate", bob, json=body).status_code == 200
    error = assert_error(deployment.post("/v1/evaluate", bob, json=body), 402, "budget_exhausted")
    assert error["details"] == {"requested": 1, "remaining": 0}
    assert deployment.post("/v1/evaluate", carol, json=body).status_code == 200

    topup, revoke = run_cli(
        deployment.env, ("topup", deployment.prefix("bob"), "--calls", "3"), ("revoke", deployment.prefix("carol"))
    )
    assert topup.returncode == 0, topup.stderr
    assert topup.stdout.strip() == f"{deployment.prefix('bob')}: budget 5 calls, 2 used"
    assert revoke.returncode == 0, revoke.stderr
    assert revoke.stdout.startswith(f"{deployment.prefix('carol')}: revoked at ")

    # the running server sees both at once (nothing cached)
    usage = httpx.get(f"{deployment.server.url}/v1/usage", headers=auth(bob)).json()
    assert (usage["budget"], usage["used"], usage["remaining"]) == (5, 2, 3)
    assert deployment.post("/v1/evaluate", bob, json=body).status_code == 200
    assert_error(deployment.post("/v1/evaluate", carol, json=body), 403, "forbidden")
    assert_error(httpx.get(f"{deployment.server.url}/v1/model", headers=auth(carol)), 403, "forbidden")
    for prefix in (deployment.prefix("bob"), deployment.prefix("carol")):
        deployment.db.assert_consistent(prefix)
    assert deployment.db.totals(deployment.prefix("carol")).used == 1  # what it spent before stays charged


def test_keys_list_shows_prefixes_and_states_but_never_a_secret(deployment: Deployment):
    listed, unknown_topup, unknown_revoke = run_cli(
        deployment.env, ("list",), ("topup", "lmaas_nope", "--calls", "1"), ("revoke", "lmaas_nope")
    )
    assert listed.returncode == 0, listed.stderr
    lines = {line.split()[0]: line for line in listed.stdout.splitlines()}
    for name in deployment.created:
        line = lines[deployment.prefix(name)]
        row = deployment.db.key_row(deployment.prefix(name))
        state = "revoked" if row.revoked_at else "active"
        assert re.search(rf"\s{state}\s+calls {row.used}/{row.budget}\s+{name}$", line), line
    for secret in deployment.secrets:
        tail = random_part(secret)
        assert secret not in listed.stdout + listed.stderr and tail not in listed.stdout + listed.stderr
    for result in (unknown_topup, unknown_revoke):
        assert result.returncode == 1
        assert result.stderr.strip() == "error: no key with prefix lmaas_nope"


def test_the_admin_http_api_creates_lists_tops_up_and_revokes(deployment: Deployment):
    url, headers = deployment.server.url, admin_auth()
    created = httpx.post(f"{url}/v1/admin/keys", json={"budget": 3, "name": "dave", "token_budget": 10**6},
                         headers=headers)  # fmt: skip
    assert created.status_code == 201, created.text
    body = created.json()
    secret, prefix = body["key"], body["prefix"]
    deployment.secrets.add(secret)
    assert KEY.match(secret).group(1) == prefix
    assert (body["budget"], body["used"], body["name"], body["token_budget"]) == (3, 0, "dave", 10**6)

    assert deployment.post("/v1/evaluate", secret, json=one_candidate_body()).status_code == 200
    listed = httpx.get(f"{url}/v1/admin/keys", headers=headers)
    assert listed.status_code == 200
    items = {item["prefix"]: item for item in listed.json()}
    assert all("key" not in item and "key_hash" not in item for item in items.values())
    for known in deployment.secrets:
        assert known not in listed.text and random_part(known) not in listed.text
    assert items[prefix]["used"] == 1 and items[deployment.prefix("alice")]["budget"] == 50

    topped = httpx.post(f"{url}/v1/admin/keys/{prefix}/topup", json={"calls": 4, "tokens": 5}, headers=headers)
    assert topped.status_code == 200 and (topped.json()["budget"], topped.json()["token_budget"]) == (7, 10**6 + 5)
    assert "key" not in topped.json()
    revoked = httpx.post(f"{url}/v1/admin/keys/{prefix}/revoke", headers=headers)
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    assert_error(deployment.post("/v1/evaluate", secret, json=one_candidate_body()), 403, "forbidden")
    missing = httpx.post(f"{url}/v1/admin/keys/lmaas_nope/topup", json={"calls": 1}, headers=headers)
    assert_error(missing, 404, "not_found", "prefix")

    (listing,) = run_cli(deployment.env, ("list",))  # the CLI sees what the HTTP API did, and vice versa
    line = next(line for line in listing.stdout.splitlines() if line.startswith(prefix))
    assert re.search(r"\srevoked\s+calls 1/7 tokens \d+/1000005\s+dave$", line), line
    assert secret not in listing.stdout


def test_prometheus_metrics_after_requests_carry_no_key_material(deployment: Deployment):
    secret = deployment.secret("alice")
    body = one_candidate_body()
    spec = {key: body[key] for key in ("template", "examples", "verbalizer")}
    handle = deployment.post("/v1/inputs", secret, json=spec).json()["handle"]
    for _ in range(2):
        by_handle = {"inputs": handle, "candidates": [{}, {"prompt_token_ids": [5]}]}
        assert deployment.post("/v1/evaluate", secret, json=by_handle).status_code == 200
    assert deployment.post("/v1/evaluate", secret, json=body).status_code == 200

    response = deployment.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    assert samples['lmaas_requests_total{endpoint="/v1/evaluate",status="200"}'] >= 3
    assert samples['lmaas_requests_total{endpoint="/v1/inputs",status="201"}'] >= 1
    assert samples["lmaas_forward_batch_rows_count"] >= 1 and samples["lmaas_forward_batch_rows_sum"] >= 1
    assert "lmaas_queue_depth" in samples
    assert samples['lmaas_cache_events_total{cache="inputs",event="hit"}'] >= 2
    with deployment.db.sessions() as session:  # everything this server settled, and nothing else
        from lmaas_server.metering.models import LedgerEntry

        calls, tokens = session.execute(
            sa.select(sa.func.sum(LedgerEntry.calls), sa.func.sum(LedgerEntry.tokens)).where(
                LedgerEntry.status == "settled"
            )
        ).one()
    assert samples["lmaas_calls_charged_total"] == calls
    assert samples["lmaas_tokens_charged_total"] == tokens
    for name in deployment.created:
        assert deployment.prefix(name) not in text
    for known in deployment.secrets:
        assert known not in text and random_part(known) not in text
    assert "Bearer" not in text and "key_hash" not in text and ADMIN_TOKEN not in text


def test_logs_at_debug_level_never_contain_keys_or_prompt_tensors(deployment: Deployment):
    secret = deployment.secret("alice")
    prompt = np.random.default_rng(20240917).normal(0, 0.37, (3, HIDDEN)).astype("<f4")
    tensor = base64.b64encode(prompt.tobytes()).decode()
    soft = {"dtype": "float32", "shape": [3, HIDDEN], "data": tensor}
    unknown = "lmaas_unknown9_" + "Q" * 43
    deployment.secrets.update({unknown, ADMIN_TOKEN})
    ok = deployment.post("/v1/evaluate", secret, json=one_candidate_body(candidates=[{"soft_prompt": soft}]))
    assert ok.status_code == 200, ok.text
    deep = {"deep_prompt": [soft, soft]}
    assert deployment.post("/v1/evaluate", secret, json=one_candidate_body(candidates=[deep])).status_code == 200
    bad = one_candidate_body(candidates=[{"soft_prompt": soft}, {"soft_prompt": non_finite(np.nan)}])
    assert deployment.post("/v1/evaluate", secret, json=bad).status_code == 422
    assert deployment.post("/v1/evaluate", unknown, json=bad).status_code == 401
    assert (
        deployment.post("/v1/evaluate", secret, json={"candidates": [{"soft_prompt": soft}], "x": tensor}).status_code
        == 422
    )
    assert httpx.get(f"{deployment.server.url}/v1/admin/keys", headers=admin_auth()).status_code == 200
    idempotent = {"Idempotency-Key": "log-check"}
    for _ in range(2):  # stored and replayed responses
        response = deployment.post("/v1/evaluate", secret, json=one_candidate_body(candidates=[{"soft_prompt": soft}]),
                                   headers=idempotent)  # fmt: skip
        assert response.status_code == 200

    time.sleep(0.5)  # let the server flush its log lines
    logs = deployment.server.logs()
    assert "POST /v1/evaluate" in logs and "sqlalchemy.engine" in logs  # requests and the SQL sent, really
    assert "api_keys.key_hash = ?" in logs and "UPDATE ledger SET status=?" in logs
    for known in deployment.secrets:
        assert known not in logs, "a secret key (or the admin token) is in the server's logs"
        assert random_part(known) not in logs
    for piece in (tensor, tensor[:40], tensor[len(tensor) // 2 : len(tensor) // 2 + 40]):
        assert piece not in logs, "a prompt tensor is in the server's logs"


# ----------------------------------------------------------------------------------------------- admin API, both DBs


def test_admin_api_in_process(database: Database, metered_server):
    with metered_server(database) as server:
        url, headers = server.url, admin_auth()
        created = httpx.post(f"{url}/v1/admin/keys", json={"budget": 2, "rate_limit": 50}, headers=headers).json()
        assert KEY.match(created["key"]) and created["rate_limit"] == 50
        listed = httpx.get(f"{url}/v1/admin/keys", headers=headers)
        assert [item["prefix"] for item in listed.json()] == [created["prefix"]]
        assert created["key"] not in listed.text
        for body, param in [
            ({"budget": -1}, "budget"),
            ({"budget": 10**16}, "budget"),
            ({"budget": 1, "rate_limit": 0}, "rate_limit"),
            ({"budget": 1, "foo": 1}, "foo"),
            ({"name": "no budget"}, "budget"),
        ]:
            response = httpx.post(f"{url}/v1/admin/keys", json=body, headers=headers)
            assert_error(response, 422, "invalid_request", param)
        assert len(database.ledger()) == 0 and len(server.meter.list_keys()) == 1
        topped = httpx.post(f"{url}/v1/admin/keys/{created['prefix']}/topup", json={"calls": 3}, headers=headers)
        assert topped.json()["budget"] == 5
        assert database.key_row(created["prefix"]).budget == 5


# Bugs these tests found (each was a 500, on PostgreSQL or SQLite), fixed in lmaas_server.metering.meter.


def test_a_key_name_with_a_nul_byte_is_422_never_a_500(database: Database, metered_server):
    """(PostgreSQL text cannot hold NUL: psycopg DataError, 500.) Refused on both databases alike."""
    with metered_server(database) as server:
        response = httpx.post(
            f"{server.url}/v1/admin/keys", json={"budget": 1, "name": "a\u0000b"}, headers=admin_auth()
        )
        assert_error(response, 422, "invalid_request", "name")
        listed = httpx.get(f"{server.url}/v1/admin/keys", headers=admin_auth())
        assert listed.status_code == 200 and listed.json() == []


def test_a_prefix_with_a_nul_byte_is_404_never_a_500(database: Database, metered_server):
    """(A NUL in {prefix} reached PostgreSQL in the WHERE clause: 500.)"""
    with metered_server(database) as server:
        for action, body in (("topup", {"calls": 1}), ("revoke", None)):
            response = httpx.post(f"{server.url}/v1/admin/keys/lmaas_%00x/{action}", json=body, headers=admin_auth())
            assert_error(response, 404, "not_found", "prefix")


@pytest.mark.parametrize("expires_at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_an_expiry_at_the_edge_of_the_calendar_is_422_and_does_not_break_the_key_list(database: Database,
                                                                                      metered_server, expires_at):  # fmt: skip
    """(Its UTC time is year 0 or 10000: PostgreSQL stored it, and from then on every read of that row failed:
    GET /v1/admin/keys and `keys list` answered 500 for all keys, and the key's own requests 500.)"""
    with metered_server(database) as server:
        secret, _ = server.meter.create_key(5, name="bystander")
        response = httpx.post(
            f"{server.url}/v1/admin/keys", json={"budget": 1, "expires_at": expires_at}, headers=admin_auth()
        )
        assert_error(response, 422, "invalid_request", "expires_at")
        listed = httpx.get(f"{server.url}/v1/admin/keys", headers=admin_auth())
        assert listed.status_code == 200 and [k["name"] for k in listed.json()] == ["bystander"], listed.text
        assert httpx.get(f"{server.url}/v1/model", headers=auth(secret)).status_code == 200


def test_a_key_expiring_in_an_hour_written_with_a_utc_offset_works(database: Database, metered_server):
    """(SQLite stored expires_at's wall-clock time without its offset and read it back as UTC: a key expiring
    in an hour, written in UTC-05:00, was refused at once as expired, 403.)"""
    instant = datetime.now(UTC) + timedelta(hours=1)
    given = instant.astimezone(timezone(timedelta(hours=-5))).isoformat()
    with metered_server(database) as server:
        created = httpx.post(
            f"{server.url}/v1/admin/keys", json={"budget": 1, "expires_at": given}, headers=admin_auth()
        )
        assert created.status_code == 201
        response = httpx.get(f"{server.url}/v1/model", headers=auth(created.json()["key"]))
        assert response.status_code == 200, response.text
        listed = httpx.get(f"{server.url}/v1/admin/keys", headers=admin_auth()).json()
        assert datetime.fromisoformat(listed[0]["expires_at"]) == instant


def test_top_ups_past_the_largest_counter_are_422_never_a_500(database: Database, metered_server):
    """(Repeated top-ups of 10^15 calls or 10^18 tokens, each valid alone, overflowed BIGINT: PostgreSQL
    answered 500 'bigint out of range'.)"""
    with metered_server(database) as server:
        url, headers = server.url, admin_auth()
        created = httpx.post(f"{url}/v1/admin/keys", json={"budget": 10**15, "token_budget": 10**18}, headers=headers)
        prefix = created.json()["prefix"]
        statuses = []
        for _ in range(12):
            topped = httpx.post(f"{url}/v1/admin/keys/{prefix}/topup", json={"tokens": 10**18}, headers=headers)
            statuses.append(topped.status_code)
            if topped.status_code != 200:
                assert_error(topped, 422, "invalid_request", "tokens")
        assert statuses == [200] * 8 + [422] * 4  # 9 x 10^18 fits below 2^63, 10 x 10^18 does not
        assert database.key_row(prefix).token_budget == 9 * 10**18
        assert httpx.get(f"{url}/v1/admin/keys", headers=headers).status_code == 200


# ----------------------------------------------------------------------------------------------- first-time migrations


# A process that migrates each database URL it reads from stdin, as soon as it reads it, and answers "ok" or
# the error: started once and imported, the processes of a round then migrate within milliseconds of each other.
MIGRATOR = """
import sys
from lmaas_server.metering.db import make_engine, migrate
print("ready", flush=True)
for line in sys.stdin:
    try:
        engine = make_engine(line.strip())
        migrate(engine)
        engine.dispose()
        print("ok", flush=True)
    except Exception as exc:
        print("error", type(exc).__name__, str(exc).splitlines()[0][:200], flush=True)
"""


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_processes_starting_together_on_a_new_database_all_migrate_it(backend, tmp_path):
    """A server and `keys create` (or two replicas) started at once on a database nobody migrated yet. (Found a
    bug: on SQLite, where migrate() took no lock, a process died with 'table alembic_version already exists';
    and one in ten rounds, 'database is locked' from switching the new database to WAL.)"""
    rounds = size(25, 100) if backend == "sqlite" else size(4, 20)  # creating a PostgreSQL database: ~0.5 s
    processes = 3
    workers = [subprocess.Popen([sys.executable, "-c", MIGRATOR], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for _ in range(processes)]  # fmt: skip
    admin = _pg_admin() if backend == "postgresql" else None
    created: list[str] = []
    try:
        assert [worker.stdout.readline().strip() for worker in workers] == ["ready"] * processes
        for round_ in range(rounds):
            if backend == "sqlite":
                url = f"sqlite:///{tmp_path / f'race-{round_}.db'}"
            else:
                name = f"lmaas_test_race_{round_}_{int(time.time() * 1000) % 10**9}"
                with admin.connect() as connection:
                    connection.execute(sa.text(f'CREATE DATABASE "{name}"'))
                created.append(name)
                url = _pg_url(name)
            for worker in workers:
                worker.stdin.write(url + "\n")
            for worker in workers:
                worker.stdin.flush()
            answers = [worker.stdout.readline().strip() for worker in workers]
            assert answers == ["ok"] * processes, f"round {round_}: {answers}"
            engine = sa.create_engine(normalize_url(url))
            with engine.connect() as connection:
                assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
                assert connection.execute(sa.text("SELECT count(*) FROM api_keys")).scalar() == 0
            engine.dispose()
    finally:
        for worker in workers:
            worker.stdin.close()
            worker.wait(timeout=60)
        if admin is not None:
            with admin.connect() as connection:
                for name in created:
                    connection.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
            admin.dispose()
