"""One table of bad requests to a metered server (keys required), on SQLite and PostgreSQL: missing,
unknown, revoked and expired keys, exhausted call and token budgets, rate limits, oversized bodies, bad
tensors and fields, unknown handles and handles of other keys, and the admin API's token checks. Each gets
its documented status in the single error shape, and none is charged: every key's counters and every
ledger row are the same before and after. (Prompts that could overflow once the server projects or
multiplies them are found by bounds checked before the reservation: no ledger row at all.)"""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import pytest

from lmaas_protocol import BUNDLE_MEDIA_TYPE, IDEMPOTENCY_HEADER
from tests.server.metering.conftest import ADMIN_TOKEN, Database, MeteredServer, admin_auth, auth
from tests.server.test_api import TEXTS, assert_error, evaluate_body, label_ids, non_finite, soft, too_big
from tests.support.tiny_models import HIDDEN

SMALL_BODY = 2048
SOFT = "candidates.0.soft_prompt"


@pytest.fixture(scope="module")
def table(module_database: Database, engines):
    """Three servers on one database: the main one, one with a small body limit, one without admin API."""
    db = module_database
    meter = db.meter(f"table-{db.backend}")
    main_engine, small_engine = engines("llama"), engines("llama", max_body_bytes=SMALL_BODY)
    secrets = {}
    for name, options in {
        "good": dict(budget=1000),
        "other": dict(budget=1000),
        "revoked": dict(budget=10),
        "expired": dict(budget=10, expires_at=datetime.now(UTC) - timedelta(minutes=1)),
        "one-left": dict(budget=1),
        "empty": dict(budget=0),
        "few-tokens": dict(budget=100, token_budget=5),
        "rate": dict(budget=100, rate_limit=0.01),  # a burst of one request, then one per 100 s
    }.items():
        secrets[name], described = meter.create_key(name=name, **options)
        if name == "revoked":
            meter.revoke(described.prefix)
    servers = {
        "main": MeteredServer(main_engine, meter, db),
        "small": MeteredServer(small_engine, meter, db),
        "no-admin": MeteredServer(main_engine, meter, db, admin_token=None),
    }
    for server in servers.values():
        server.__enter__()
    clients = {name: httpx.Client(base_url=server.url, timeout=60) for name, server in servers.items()}
    try:
        tokenizer = main_engine.loaded.tokenizer
        verbalizer = label_ids(lambda words: tokenizer(words, add_special_tokens=False)["input_ids"], "causal")
        body = evaluate_body("causal", verbalizer, [{"soft_prompt": soft(2)}], texts=TEXTS[:2])
        spec = {key: body[key] for key in ("template", "examples", "verbalizer")}
        handles = {}
        for owner in ("good", "other"):
            response = clients["main"].post("/v1/inputs", json=spec, headers=auth(secrets[owner]))
            assert response.status_code == 201, response.text
            handles[owner] = response.json()["handle"]
        yield {
            "db": db,
            "clients": clients,
            "secrets": secrets,
            "body": body,
            "handles": handles,
            "info": main_engine.info,
        }
    finally:
        for client in clients.values():
            client.close()
        for server in servers.values():
            server.__exit__(None, None, None)


@dataclass(frozen=True)
class Bad:
    send: Callable[[dict], httpx.Response]
    status: int
    code: str
    param: str | None = None
    details: dict | None = None
    headers: dict | None = None  # expected response headers
    refunded: bool = False  # rejected after its reservation: one new ledger row, refunded; the counters equal


def evaluate_raw(content: Callable[[dict], bytes], content_type: str | None, key: str = "good"):
    """POST /v1/evaluate with a hand-made body (from the table's valid one) and content type."""

    def send(ctx):
        headers = {**auth(ctx["secrets"][key]), **({"content-type": content_type} if content_type else {})}
        return ctx["clients"]["main"].post("/v1/evaluate", content=content(ctx["body"]), headers=headers)

    return send


def f32(array) -> dict:
    return {
        "dtype": "float32",
        "shape": list(np.shape(array)),
        "data": base64.b64encode(np.asarray(array, "<f4").tobytes()).decode(),
    }


HUGE = 3e38  # finite in float32; twice it is not
PROJECTION = {"seed": 7, "scale": 1e6, "dim": 8, "shape": [2, HIDDEN]}


def evaluate(key: str | None = "good", mutate=None, server: str = "main", headers=None, content=None):
    """POST /v1/evaluate with the table's valid body, changed by `mutate(body, ctx)`, as key `key`."""

    def send(ctx):
        body = copy.deepcopy(ctx["body"])
        if mutate is not None:
            mutate(body, ctx)
        sent = {**(auth(ctx["secrets"][key]) if key in ctx["secrets"] else {}), **(headers or {})}
        if key is not None and key not in ctx["secrets"]:
            sent["Authorization"] = key  # a raw Authorization header
        if content is not None:
            return ctx["clients"][server].post(
                "/v1/evaluate", content=content(body), headers={**sent, "content-type": "application/json"}
            )
        return ctx["clients"][server].post("/v1/evaluate", json=body, headers=sent)

    return send


def call(method: str, path: str, key: str | None = "good", json=None, server: str = "main", admin: str | None = None,
         headers: dict | None = None):  # fmt: skip
    """Any request; `path` may use {good} / {other} for the inputs handles of those keys."""
    extra = headers or {}

    def send(ctx):
        headers = admin_auth(admin) if admin is not None else auth(ctx["secrets"][key]) if key else {}
        headers = {**headers, **extra}
        url = path.format(**ctx["handles"])
        body = json(ctx) if callable(json) else json
        return ctx["clients"][server].request(method, url, json=body, headers=headers)

    return send


def set_path(path: str, value):
    def mutate(body, ctx):
        *parents, last = path.split(".")
        target = body
        for part in parents:
            target = target[int(part)] if isinstance(target, list) else target[part]
        new = value(ctx) if callable(value) else value
        if isinstance(target, list):
            target[int(last)] = new
        else:
            target[last] = new

    return mutate


def use_handle(owner: str | None, handle: str | None = None):
    def mutate(body, ctx):
        for field in ("template", "examples", "verbalizer"):
            body.pop(field)
        body["inputs"] = ctx["handles"][owner] if owner else handle

    return mutate


def rate_limited(ctx) -> httpx.Response:
    free = ctx["clients"]["main"].get("/v1/model", headers=auth(ctx["secrets"]["rate"]))  # takes the only token
    assert free.status_code in (200, 429), free.text
    return evaluate("rate")(ctx)


BEARER = {"www-authenticate": "Bearer"}
NEW_KEY = {"budget": 5, "name": "x"}
ADMIN_ENDPOINTS = [
    ("GET", "/v1/admin/keys", None),
    ("POST", "/v1/admin/keys", NEW_KEY),
    ("POST", "/v1/admin/keys/lmaas_whatever/topup", {"calls": 5}),
    ("POST", "/v1/admin/keys/lmaas_whatever/revoke", None),
]

BAD = {
    # 401 / 403: who is asking
    "missing-key": Bad(evaluate(None), 401, "unauthorized", headers=BEARER),
    "missing-key-model": Bad(call("GET", "/v1/model", None), 401, "unauthorized", headers=BEARER),
    "missing-key-usage": Bad(call("GET", "/v1/usage", None), 401, "unauthorized", headers=BEARER),
    "missing-key-tokenize": Bad(call("POST", "/v1/tokenize", None, {"texts": ["a"]}), 401, "unauthorized"),
    "missing-key-inputs": Bad(call("POST", "/v1/inputs", None, {"template": "x"}), 401, "unauthorized"),
    "missing-key-layer-std": Bad(call("POST", "/v1/layer_std", None, {"inputs": "inp_x"}), 401, "unauthorized"),
    "missing-key-prompts": Bad(call("GET", "/v1/prompts", None), 401, "unauthorized", headers=BEARER),
    "missing-key-deploy": Bad(call("POST", "/v1/prompts", None, {"template": "x"}), 401, "unauthorized"),
    "missing-key-classify": Bad(
        call("POST", "/v1/classify", None, {"prompt": "pr_x", "texts": [{"text_a": "a"}]}), 401, "unauthorized"
    ),
    "basic-auth-instead-of-bearer": Bad(evaluate("Basic dXNlcjpwYXNz"), 401, "unauthorized", headers=BEARER),
    "empty-bearer": Bad(evaluate("Bearer"), 401, "unauthorized"),
    "unknown-key": Bad(evaluate("Bearer lmaas_unknown1_" + "x" * 43), 401, "unauthorized", headers=BEARER),
    "admin-token-as-api-key": Bad(evaluate(f"Bearer {ADMIN_TOKEN}"), 401, "unauthorized"),
    "revoked-key": Bad(evaluate("revoked"), 403, "forbidden"),
    "revoked-key-usage": Bad(call("GET", "/v1/usage", "revoked"), 403, "forbidden"),
    "expired-key": Bad(evaluate("expired"), 403, "forbidden"),
    # 402 / 429: budgets and rate limits
    "budget-exhausted": Bad(
        evaluate("one-left", set_path("candidates", [{}, {"soft_prompt": soft(2)}])),
        402,
        "budget_exhausted",
        details={"requested": 2, "remaining": 1},
    ),
    "budget-zero": Bad(evaluate("empty"), 402, "budget_exhausted", details={"requested": 1, "remaining": 0}),
    "budget-zero-layer-std": Bad(
        call("POST", "/v1/layer_std", "empty", {"inputs": "inp_nope"}), 404, "not_found", "inputs"
    ),  # a bad handle is 404 before any budget check
    "token-budget-exhausted": Bad(evaluate("few-tokens"), 402, "budget_exhausted"),
    "rate-limited": Bad(rate_limited, 429, "rate_limited", details={"rate_limit": 0.01}),
    # 413
    "oversized-body": Bad(
        evaluate(server="small", content=lambda b: too_big(b)),
        413,
        "payload_too_large",
        details={"max_body_bytes": SMALL_BODY},
    ),
    "oversized-body-without-key": Bad(
        evaluate(None, server="small", content=lambda b: too_big(b)),
        413,
        "payload_too_large",
        details={"max_body_bytes": SMALL_BODY},
    ),
    # 400 / 415: not a JSON object, or not a body the server reads
    "malformed-json": Bad(evaluate_raw(lambda b: b'{"template": ', "application/json"), 400, "invalid_request"),
    "json-array-body": Bad(evaluate_raw(lambda b: b"[1, 2]", "application/json"), 400, "invalid_request"),
    "malformed-bundle": Bad(evaluate_raw(lambda b: b"LMB1garbage", BUNDLE_MEDIA_TYPE), 400, "invalid_request"),
    "text-plain-body": Bad(evaluate_raw(lambda b: json.dumps(b).encode(), "text/plain"), 415, "unsupported_media_type"),
    "no-content-type": Bad(evaluate_raw(lambda b: json.dumps(b).encode(), None), 415, "unsupported_media_type"),
    # 422: tensors, fields, ids (each would be charged if it got through)
    "nan-tensor": Bad(evaluate(mutate=set_path(SOFT, non_finite(np.nan))), 422, "invalid_request", SOFT + ".data"),
    "inf-tensor-float16": Bad(
        evaluate(mutate=set_path(SOFT, non_finite(np.inf, "float16"))), 422, "invalid_request", SOFT + ".data"
    ),
    "wrong-dtype": Bad(evaluate(mutate=set_path(SOFT + ".dtype", "float64")), 422, "invalid_request", SOFT + ".dtype"),
    "int-dtype": Bad(
        evaluate(mutate=set_path(SOFT, {**soft(2), "dtype": "int32"})), 422, "invalid_request", SOFT + ".dtype"
    ),
    "wrong-shape": Bad(evaluate(mutate=set_path(SOFT, soft(2, HIDDEN // 2))), 422, "invalid_request", SOFT + ".shape"),
    "3d-shape": Bad(
        evaluate(mutate=set_path(SOFT, soft(2, shape=[1, 2, HIDDEN]))), 422, "invalid_request", SOFT + ".shape"
    ),
    "data-length-vs-shape": Bad(
        evaluate(mutate=set_path(SOFT, soft(2, shape=[3, HIDDEN]))), 422, "invalid_request", SOFT + ".data"
    ),
    "non-base64-data": Bad(
        evaluate(mutate=set_path(SOFT + ".data", "not base64!")), 422, "invalid_request", SOFT + ".data"
    ),
    "negative-shape": Bad(
        evaluate(mutate=set_path(SOFT, soft(2, shape=[-2, -HIDDEN]))), 422, "invalid_request", SOFT + ".shape"
    ),
    "nan-projected-z": Bad(
        evaluate(mutate=set_path(SOFT, {"z": f32([np.nan] * 8), "projection": PROJECTION})),
        422,
        "invalid_request",
        SOFT + ".z.data",
    ),
    "projection-overflows-to-inf": Bad(
        evaluate(mutate=set_path(SOFT, {"z": f32([HUGE] * 8), "projection": PROJECTION})),
        422,
        "invalid_request",
        "candidates.0",
    ),
    "low-rank-offset-overflows-to-inf": Bad(
        evaluate(
            mutate=set_path(
                "candidates.0",
                {
                    "embedding_offset": {
                        "a": f32(np.full((3, 2), HUGE)),
                        "b": f32(np.full((2, HIDDEN), HUGE)),
                        "scale": 1.0,
                    }
                },
            )
        ),
        422,
        "invalid_request",
        "candidates.0",
    ),
    "deep-prompt-drives-logits-to-nan": Bad(
        evaluate(mutate=set_path("candidates.0", {"deep_prompt": [f32(np.full((2, HIDDEN), HUGE))] * 2})),
        422,
        "invalid_request",
        "candidates.0",
    ),
    "unknown-top-level-field": Bad(evaluate(mutate=set_path("foo", 1)), 422, "invalid_request", "foo"),
    "unknown-candidate-field": Bad(
        evaluate(mutate=set_path("candidates.0.foo", 1)), 422, "invalid_request", "candidates.0.foo"
    ),
    "verbalizer-id-over-vocab": Bad(
        evaluate(mutate=set_path("verbalizer.1", lambda ctx: [ctx["info"].vocab_size])),
        422,
        "invalid_request",
        "verbalizer.1.0",
    ),
    "prompt-id-over-vocab": Bad(
        evaluate(mutate=set_path("candidates.0", lambda ctx: {"prompt_token_ids": [5, ctx["info"].vocab_size]})),
        422,
        "invalid_request",
        "candidates.0.prompt_token_ids.1",
    ),
    "prompt-id-negative": Bad(
        evaluate(mutate=set_path("candidates.0", {"prompt_token_ids": [-1]})),
        422,
        "invalid_request",
        "candidates.0.prompt_token_ids.0",
    ),
    "idempotency-key-too-long": Bad(
        evaluate(headers={IDEMPOTENCY_HEADER: "k" * 129}), 422, "invalid_request", "header.Idempotency-Key"
    ),
    "idempotency-key-too-long-layer-std": Bad(
        call(
            "POST",
            "/v1/layer_std",
            "good",
            lambda ctx: {"inputs": ctx["handles"]["good"]},
            headers={IDEMPOTENCY_HEADER: "k" * 129},
        ),
        422,
        "invalid_request",
        "header.Idempotency-Key",
    ),
    "tokenize-unknown-field": Bad(
        call("POST", "/v1/tokenize", "good", {"texts": ["a"], "foo": 1}), 422, "invalid_request", "foo"
    ),
    "inputs-unknown-field": Bad(
        call(
            "POST",
            "/v1/inputs",
            "good",
            lambda ctx: {**{k: ctx["body"][k] for k in ("template", "examples", "verbalizer")}, "candidates": []},
        ),
        422,
        "invalid_request",
        "candidates",
    ),
    "inputs-bad-verbalizer-id": Bad(
        call(
            "POST",
            "/v1/inputs",
            "good",
            lambda ctx: {
                "template": ctx["body"]["template"],
                "examples": ctx["body"]["examples"],
                "verbalizer": [[5], [ctx["info"].vocab_size]],
            },
        ),
        422,
        "invalid_request",
        "verbalizer.1.0",
    ),
    # 404: handles are per key
    "unknown-handle": Bad(evaluate(mutate=use_handle(None, "inp_doesnotexist")), 404, "not_found", "inputs"),
    "malformed-handle": Bad(evaluate(mutate=use_handle(None, "not a handle/../x")), 404, "not_found", "inputs"),
    "unknown-handle-layer-std": Bad(
        call("POST", "/v1/layer_std", "good", {"inputs": "inp_nope"}), 404, "not_found", "inputs"
    ),
    "unknown-handle-delete": Bad(call("DELETE", "/v1/inputs/inp_nope"), 404, "not_found", "handle"),
    "handle-of-another-key": Bad(evaluate(mutate=use_handle("other")), 404, "not_found", "inputs"),
    "handle-of-another-key-layer-std": Bad(
        call("POST", "/v1/layer_std", "good", lambda ctx: {"inputs": ctx["handles"]["other"]}),
        404,
        "not_found",
        "inputs",
    ),
    "handle-of-another-key-delete": Bad(call("DELETE", "/v1/inputs/{other}", "good"), 404, "not_found", "handle"),
    "handle-of-another-key-without-key": Bad(call("DELETE", "/v1/inputs/{other}", None), 401, "unauthorized"),
    # admin API: 401 without or with a wrong token, and when disabled (no token can be right)
    **{
        f"admin-{method.lower()}-{path.split('/')[-1]}-{case}": Bad(
            call(method, path, None, body, server=server, admin=token), status, code, headers=headers
        )
        for method, path, body in ADMIN_ENDPOINTS
        for case, token, server, status, code, headers in [
            ("no-token", None, "main", 401, "unauthorized", BEARER),
            ("wrong-token", ADMIN_TOKEN + "x", "main", 401, "unauthorized", BEARER),
            ("api-key-as-token", "lmaas_x", "main", 401, "unauthorized", BEARER),
            ("disabled", ADMIN_TOKEN, "no-admin", 401, "unauthorized", BEARER),
        ]
    },
}


@pytest.mark.parametrize("case", [pytest.param(case, id=name) for name, case in BAD.items()])
def test_bad_request_gets_its_status_in_the_error_shape_and_is_not_charged(table, case: Bad):
    db: Database = table["db"]
    before = db.snapshot()
    response = case.send(table)
    error = assert_error(response, case.status, case.code, case.param)
    if case.details is not None:
        assert error["details"] == case.details
    for name, value in (case.headers or {}).items():
        assert response.headers.get(name) == value, response.headers
    if case.status == 429:
        assert 0 < float(response.headers["retry-after"]) <= 100
    credential = response.request.headers.get("authorization", "").split(" ")[-1]
    if len(credential) > 8:
        assert credential not in response.text  # a key or token is never echoed
    if case.refunded:  # found after the reservation: refunded at once, in the same request
        keys, rows = db.snapshot()
        assert keys == before[0] and rows[: len(before[1])] == before[1], (before, keys, rows)
        assert [status for _, status in rows[len(before[1]) :]] == ["refunded"]
    else:
        assert db.snapshot() == before  # no counter moved and no ledger row appeared or changed
    assert table["clients"]["main"].get("/v1/health").status_code == 200


def test_token_budget_exhaustion_reports_the_tokens(table):
    error = assert_error(evaluate("few-tokens")(table), 402, "budget_exhausted")
    details = error["details"]
    assert details["remaining_tokens"] == 5 and details["requested_tokens"] > 5
    assert (details["requested"], details["remaining"]) == (1, 100)


def test_the_owner_of_a_handle_can_use_it_and_the_table_body_is_charged_once(table):
    """The sanity check of the table: its valid requests do succeed and are charged exactly once."""
    db: Database = table["db"]
    client, secrets = table["clients"]["main"], table["secrets"]
    prefix = client.get("/v1/usage", headers=auth(secrets["good"])).json()["key_prefix"]
    used = db.assert_consistent(prefix).used
    ok = evaluate("good")(table)
    assert ok.status_code == 200, ok.text
    by_handle = evaluate("good", use_handle("good"))(table)
    assert by_handle.status_code == 200, by_handle.text
    layer_std = client.post("/v1/layer_std", json={"inputs": table["handles"]["good"]}, headers=auth(secrets["good"]))
    assert layer_std.status_code == 200, layer_std.text
    totals = db.assert_consistent(prefix)
    assert totals.used == used + 3 and totals.reserved == 0
    other = client.get("/v1/usage", headers=auth(secrets["other"])).json()
    assert other["used"] == 0  # the other key's handle was never charged to anyone
