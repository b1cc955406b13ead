"""Deployed prompts over real HTTP on SQLite and PostgreSQL: stored per key, used by id to classify (charged one
call per text, the same scores as /v1/evaluate), invisible to other keys, checked against the model at upload,
shared by replicas; bad requests are refused before any charge."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from alembic import command
from alembic.config import Config

from lmaas_server.errors import InvalidRequest
from lmaas_server.metering.db import MIGRATIONS, make_engine, migrate
from lmaas_server.metering.prompt_store import PromptStore
from tests.server.metering.conftest import CAUSAL_TEMPLATE, VERBALIZER, Database, MeteredServer, auth
from tests.server.support import assert_error, normal, tensor_json
from tests.support.tiny_models import HIDDEN, LAYERS

TEXTS = ["a fun film", "dull and slow", "loved every minute"]


def prompt_body(**changes) -> dict:
    body = {"name": "reviews", "candidate": {"soft_prompt": tensor_json(normal(1, 2, HIDDEN, scale=0.05))},
            "template": CAUSAL_TEMPLATE, "verbalizer": VERBALIZER, "labels": ["negative", "positive"],
            "calibration": {"bias": [0.3, -0.3], "scale": 1.5}}  # fmt: skip
    return {**body, **changes}


def classify_body(prompt_id: str, texts=TEXTS) -> dict:
    return {"prompt": prompt_id, "texts": [{"text_a": t} for t in texts]}


def deploy(client: httpx.Client, **changes) -> str:
    response = client.post("/v1/prompts", json=prompt_body(**changes))
    assert response.status_code == 201, response.text
    return response.json()["id"]


def test_deploy_list_classify_replay_and_delete(database: Database, metered_server):
    with metered_server(database) as server:
        secret, key = server.meter.create_key(100)
        with httpx.Client(base_url=server.url, headers=auth(secret), timeout=60) as client:
            prompt_id = deploy(client)
            assert deploy(client) == prompt_id  # the same prompt again: the same id, no copy
            listed = client.get("/v1/prompts").json()["prompts"]
            info = client.get(f"/v1/prompts/{prompt_id}").json()
            before = database.assert_consistent(key.prefix)
            classified = client.post("/v1/classify", json=classify_body(prompt_id)).json()
            after = database.assert_consistent(key.prefix)
            body = prompt_body()
            evaluated = client.post("/v1/evaluate", json={
                "template": body["template"], "verbalizer": body["verbalizer"],
                "examples": [{"text_a": t} for t in TEXTS], "candidates": [body["candidate"]]}).json()  # fmt: skip
            headers = {"Idempotency-Key": "classify-1"}
            first = client.post("/v1/classify", json=classify_body(prompt_id), headers=headers)
            replayed = client.post("/v1/classify", json=classify_body(prompt_id), headers=headers)
            charged = database.assert_consistent(key.prefix).used
            assert client.delete(f"/v1/prompts/{prompt_id}").status_code == 204
            gone = client.post("/v1/classify", json=classify_body(prompt_id))
            assert_error(client.get(f"/v1/prompts/{prompt_id}"), 404, "not_found", "prompt_id")
    assert [p["id"] for p in listed] == [prompt_id] and info == listed[0]
    assert (info["labels"], info["forms"], info["prompt_length"], info["calibrated"]) == (
        ["negative", "positive"], ["soft_prompt"], 2, True)  # fmt: skip
    assert after.used - before.used == 3 == classified["usage"]["calls"]  # one call per text
    assert after.tokens_used - before.tokens_used == classified["usage"]["tokens"] > 0
    logits = np.frombuffer(base64.b64decode(evaluated["results"][0]["logits"]["data"]), "<f4").reshape(3, 2)
    z = logits.astype(np.float64) * 1.5 + np.array([0.3, -0.3])  # the stored calibration
    expected = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    got = np.array([[r["probabilities"]["negative"], r["probabilities"]["positive"]] for r in classified["results"]])
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert [r["label"] for r in classified["results"]] == [["negative", "positive"][i] for i in expected.argmax(1)]
    assert first.status_code == replayed.status_code == 200 and replayed.headers["idempotent-replayed"] == "true"
    assert replayed.json() == first.json() and charged == after.used + 1 + 3  # evaluate 1, the classify once
    assert_error(gone, 404, "not_found", "prompt")


def test_another_key_can_neither_read_use_nor_delete_a_prompt(database: Database, metered_server):
    with metered_server(database) as server:
        owner, _ = server.meter.create_key(100)
        other, _ = server.meter.create_key(100)
        with httpx.Client(base_url=server.url, headers=auth(owner), timeout=60) as client:
            prompt_id = deploy(client)
        with httpx.Client(base_url=server.url, headers=auth(other), timeout=60) as client:
            before = database.snapshot()
            assert client.get("/v1/prompts").json() == {"prompts": []}
            assert_error(client.get(f"/v1/prompts/{prompt_id}"), 404, "not_found", "prompt_id")
            assert_error(client.post("/v1/classify", json=classify_body(prompt_id)), 404, "not_found", "prompt")
            assert_error(client.delete(f"/v1/prompts/{prompt_id}"), 404, "not_found", "prompt_id")
            assert database.snapshot() == before  # nothing charged
            assert deploy(client) != prompt_id  # the same content deployed by another key: its own id
        with httpx.Client(base_url=server.url, headers=auth(owner), timeout=60) as client:
            assert client.post("/v1/classify", json=classify_body(prompt_id)).status_code == 200


def misfits() -> list[tuple[dict, str]]:
    """Prompts that do not fit the tiny llama, with the field the 422 names."""
    soft = {"soft_prompt": tensor_json(normal(2, 2, HIDDEN + 1))}
    deep = {"deep_prompt": [tensor_json(normal(3, 2, HIDDEN))] * (LAYERS + 1)}
    return [
        (prompt_body(candidate=soft), "candidate.soft_prompt.shape"),
        (prompt_body(candidate={"prompt_token_ids": [5, 10**6]}), "candidate.prompt_token_ids.1"),
        (prompt_body(candidate=deep), "candidate.deep_prompt"),
        (prompt_body(verbalizer=[[5], [10**6]]), "verbalizer.1.0"),
        (prompt_body(template="{prompt}{mask} Review: {text_a}"), "template"),  # causal: {mask} must end it
        (prompt_body(labels=["negative"]), "labels"),
        (prompt_body(labels=["good", "good"]), "labels.1"),
        (prompt_body(calibration={"bias": [0.1, 0.2, 0.3]}), "calibration.bias"),
        (prompt_body(template="Review: {text_a}\nSentiment:{mask}"), "template"),  # no {prompt} slot
    ]


def test_bad_requests_are_refused_with_the_field_and_never_charged(database: Database, metered_server):
    with metered_server(database, max_classify_texts=4, max_classify_chars=50) as server:
        secret, _ = server.meter.create_key(100)
        with httpx.Client(base_url=server.url, headers=auth(secret), timeout=60) as client:
            prompt_id = deploy(client)
            pair_id = deploy(client, template="{prompt}{text_a} ? {text_b} :{mask}")
            before = database.snapshot()
            for body, param in misfits():
                assert_error(client.post("/v1/prompts", json=body), 422, "invalid_request", param)
            requests = [
                (classify_body("pr_" + "0" * 32), 404, "prompt"),  # unknown
                (classify_body("../../etc\x00"), 404, "prompt"),  # not an id at all
                (classify_body(prompt_id, [""]), 422, "texts.0.text_a"),  # empty
                (classify_body(prompt_id, ["fine", "   "]), 422, "texts.1.text_a"),  # blank
                (classify_body(prompt_id, ["fine"] * 5), 422, "texts"),  # past max_classify_texts
                (classify_body(prompt_id, ["x" * 51]), 422, "texts.0.text_a"),  # past max_classify_chars
                (classify_body(pair_id, ["only one text"]), 422, "texts.0.text_b"),
                ({"prompt": prompt_id, "texts": []}, 422, "texts"),
                ({**classify_body(prompt_id), "extra": 1}, 422, "extra"),
            ]
            for body, status, param in requests:
                code = "not_found" if status == 404 else "invalid_request"
                assert_error(client.post("/v1/classify", json=body), status, code, param)
            assert database.snapshot() == before  # nothing charged, no ledger row
            limits = client.get("/v1/model").json()["limits"]
    assert (limits["max_classify_texts"], limits["max_classify_chars"]) == (4, 50)


def test_replicas_share_prompts_and_a_new_process_finds_them(database: Database, metered_server):
    with metered_server(database, replica="a") as first:
        secret, _ = first.meter.create_key(100)
        with httpx.Client(base_url=first.url, headers=auth(secret), timeout=60) as client:
            prompt_id = deploy(client)
            on_first = client.post("/v1/classify", json=classify_body(prompt_id)).json()
        second = MeteredServer(first.engine, database.meter("b", own_pool=True), database)  # another replica
        with second, httpx.Client(base_url=second.url, headers=auth(secret), timeout=60) as client:
            on_second = client.post("/v1/classify", json=classify_body(prompt_id)).json()
    assert on_second["results"] == on_first["results"]
    fresh = database.meter("restarted", own_pool=True)  # a restarted process: a new pool on the same database
    assert [p.id for p in fresh.prompts.list(fresh.authenticate(secret).id)] == [prompt_id]


def test_a_key_keeps_at_most_its_limit_of_prompts(database: Database):
    meter = database.meter()
    secret, _ = meter.create_key(10)
    owner = meter.authenticate(secret).id
    store = PromptStore(database.sessions, max_per_key=2)
    summary = {"name": "", "labels": ["a", "b"], "template": "{text_a}{mask}", "prompt_length": 0, "forms": [],
               "calibrated": False}  # fmt: skip
    ids = [store.add(owner, f"spec {i}".encode(), summary, "m").id for i in range(2)]
    assert store.add(owner, b"spec 0", summary, "m").id == ids[0]  # stored already: no new row, no limit hit
    with pytest.raises(InvalidRequest, match="the limit"):
        store.add(owner, b"spec 2", summary, "m")
    store.delete(owner, ids[0])
    assert store.add(owner, b"spec 2", summary, "m").id not in ids
    assert store.list(None) == []  # the no-key owner sees none of them


def test_the_migration_adds_and_removes_the_prompts_table(database: Database):
    engine = make_engine(database.url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0002")
    with engine.connect() as connection:
        assert "prompts" not in sa.inspect(connection).get_table_names()
    migrate(engine)
    with engine.connect() as connection:
        assert "prompts" in sa.inspect(connection).get_table_names()
        assert connection.execute(sa.text("SELECT version_num FROM alembic_version")).scalar() == "0003"
    engine.dispose()
