"""The HTTP API over real sockets (uvicorn in a thread) on tiny models: the happy paths, one table of bad
inputs with their documented status, error code and parameter (and that none of them is charged), the
call budget, request ids and the OpenAPI schema."""

from __future__ import annotations

import base64
import copy
import json
import re
from collections.abc import Callable
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lmaas_protocol import EvaluateRequest, ModelInfo
from lmaas_server.main import create_app
from lmaas_server.metering.budget import CallBudget
from tests.conftest import LiveServer
from tests.server.support import ERROR_KEYS, assert_error
from tests.support.tiny_models import HIDDEN

TEMPLATES = {"masked": "{prompt} . {text_a} . It was {mask} .", "causal": "{prompt}Review: {text_a}\nSentiment:{mask}"}
LABEL_WORDS = {"masked": ["bad", "great"], "causal": [" bad", " great"]}
TEXTS = ["the movie was great", "a bad film , boring and dull .", "fun to watch"]

GENERATED_ID = re.compile(r"^[0-9a-f]{32}$")


def soft(rows: int, cols: int = HIDDEN, fill: float = 0.1, dtype: str = "float32", shape=None, data=None) -> dict:
    array = np.random.default_rng(rows).normal(fill, 0.5, (rows, cols)).astype("<f2" if dtype == "float16" else "<f4")
    raw = array.tobytes()
    return {
        "dtype": dtype,
        "shape": list(shape) if shape is not None else [rows, cols],
        "data": data if data is not None else base64.b64encode(raw).decode(),
    }


def non_finite(value: float, dtype: str = "float32") -> dict:
    array = np.full((2, HIDDEN), 0.5, dtype="<f2" if dtype == "float16" else "<f4")
    array[1, 3] = value
    return {"dtype": dtype, "shape": [2, HIDDEN], "data": base64.b64encode(array.tobytes()).decode()}


def label_ids(tokenize: Callable[[list[str]], list[list[int]]], family: str) -> list[list[int]]:
    return [[ids[0]] for ids in tokenize(LABEL_WORDS[family])]


def evaluate_body(family: str, verbalizer: list[list[int]], candidates: list[dict], texts=TEXTS) -> dict:
    return {
        "template": TEMPLATES[family],
        "examples": [{"text_a": t, "label": i % 2} for i, t in enumerate(texts)],
        "verbalizer": verbalizer,
        "candidates": candidates,
    }


# ----------------------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_health_model_tokenize_and_evaluate(live_server, engines, kind):
    engine = engines(kind, budget=10)
    tokenizer = engine.loaded.tokenizer
    family = "causal" if kind == "llama" else "masked"
    with live_server(kind, budget=10) as server, httpx.Client(base_url=server.url) as client:
        health = client.get("/v1/health")
        assert health.status_code == 200
        assert health.json() == {"status": "ok", "model_loaded": True, "model": engine.info.name, "version": "0.1.0"}

        info = client.get("/v1/model").json()
        ModelInfo.model_validate(info)
        assert info["family"] == family
        assert info["hidden_size"] == HIDDEN and info["vocab_size"] == len(tokenizer)
        weight = engine.loaded.model.get_input_embeddings().weight.detach().numpy()
        assert info["embedding_std"] > 0
        assert info["embedding_std"] == pytest.approx(weight.std(ddof=1), rel=1e-4)
        assert info["max_length"] == 128
        assert info["limits"] == {
            "max_candidates": 64,
            "max_examples": 1024,
            "max_seq_len": 128,
            "max_prompt_length": 256,
            "max_body_bytes": 64 * 1024 * 1024,
            "max_projection_elements": 1 << 28,
            "max_classify_texts": 256,
            "max_classify_chars": 8192,
        }
        assert info["mask_token"] == ("[MASK]" if kind == "bert" else None)
        assert info["mask_token_id"] == (tokenizer.mask_token_id if kind == "bert" else None)

        texts = ["the movie was great", "fun"]
        plain = client.post("/v1/tokenize", json={"texts": texts}).json()
        assert plain == {"ids": tokenizer(texts, add_special_tokens=False)["input_ids"], "tokens": None}
        with_tokens = client.post("/v1/tokenize", json={"texts": texts, "return_tokens": True}).json()
        assert with_tokens["ids"] == plain["ids"]
        assert with_tokens["tokens"] == [tokenizer.convert_ids_to_tokens(ids) for ids in plain["ids"]]
        if kind == "bert":
            assert with_tokens["tokens"][0] == ["the", "movie", "was", "great"]
        special = client.post("/v1/tokenize", json={"texts": texts, "add_special_tokens": True}).json()
        assert special["ids"] == tokenizer(texts, add_special_tokens=True)["input_ids"]

        def tokenize(words):
            return client.post("/v1/tokenize", json={"texts": words}).json()["ids"]

        verbalizer = label_ids(tokenize, family)
        candidates = [{}, {"soft_prompt": soft(3)}, {"prompt_token_ids": [5, 6, 7]}]
        body = evaluate_body(family, verbalizer, candidates)
        response = client.post("/v1/evaluate", json=body)
        assert response.status_code == 200, response.text
        result = response.json()
        assert result["request_id"] == response.headers["x-request-id"]
        assert result["model"] == engine.info.name
        assert result["usage"]["calls"] == len(candidates) and result["usage"]["examples"] == len(TEXTS)
        assert result["usage"]["tokens"] > 0
        assert result["usage"]["budget_remaining"] == 10 - len(candidates)
        assert len(result["results"]) == len(candidates)
        logits = []
        for item in result["results"]:
            assert item["logits"]["dtype"] == "float32" and item["logits"]["shape"] == [len(TEXTS), 2]
            values = np.frombuffer(base64.b64decode(item["logits"]["data"]), "<f4").reshape(len(TEXTS), 2)
            assert np.isfinite(values).all()
            assert item["loss"] is not None and 0 <= item["accuracy"] <= 1
            logits.append(values)
        assert np.abs(logits[0] - logits[1]).max() > 1e-4  # the soft prompt travelled and was used
        direct = engine.evaluate(EvaluateRequest.model_validate(body), CallBudget(None))
        np.testing.assert_allclose(np.stack(logits), np.stack([r.logits.to_numpy() for r in direct.results]), atol=1e-5)

        again = client.post("/v1/evaluate", json={**body, "candidates": [{"soft_prompt": soft(2)}]}).json()
        assert again["usage"]["calls"] == 1 and again["usage"]["budget_remaining"] == 10 - len(candidates) - 1


def test_openapi_lists_the_endpoints_and_docs_serve_html(engines):
    engine = engines("llama")
    client = TestClient(create_app(engine.settings, engine=engine))
    schema = client.get("/openapi.json").json()
    assert {path: set(ops) for path, ops in schema["paths"].items()} == {
        "/v1/health": {"get"},
        "/v1/model": {"get"},
        "/v1/tokenize": {"post"},
        "/v1/evaluate": {"post"},
        "/v1/inputs": {"post"},
        "/v1/inputs/{handle}": {"delete"},
        "/v1/layer_std": {"post"},
        "/v1/usage": {"get"},
        "/v1/prompts": {"get", "post"},
        "/v1/prompts/{prompt_id}": {"get", "delete"},
        "/v1/classify": {"post"},
        "/v1/admin/keys": {"get", "post"},
        "/v1/admin/keys/{prefix}/topup": {"post"},
        "/v1/admin/keys/{prefix}/revoke": {"post"},
        "/metrics": {"get"},
    }
    evaluate = schema["paths"]["/v1/evaluate"]["post"]
    body = evaluate["requestBody"]["content"]
    assert set(body["application/json"]["schema"]["properties"]) >= {"candidates", "inputs", "template", "projections"}
    assert "application/x-lmaas-bundle" in body
    assert {"Candidate", "Projected", "ProjectionSpec", "LowRankOffset"} <= set(schema["components"]["schemas"])
    for status in ("400", "402", "413", "422"):
        ref = evaluate["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse"), (status, ref)
    assert {"ErrorResponse", "Tensor", "ModelInfo"} <= set(schema["components"]["schemas"])
    docs = client.get("/docs")
    assert docs.status_code == 200 and docs.headers["content-type"].startswith("text/html")
    assert "swagger-ui" in docs.text and "/openapi.json" in docs.text


def test_model_not_loaded_is_503_with_retry_after(engines):
    settings = engines("llama").settings
    client = TestClient(create_app(settings, engine=None))  # no `with`: the lifespan never loads a model
    response = client.get("/v1/health")
    assert_error(response, 503, "model_not_ready")
    assert response.headers["retry-after"] == "5"


# ----------------------------------------------------------------------------------------------- the table of bad inputs

MAIN_LIMITS = dict(budget=1000, max_candidates=2, max_examples=3)
SMALL_BODY = 2048


@pytest.fixture(scope="module")
def table_servers(engines):
    """Two llama servers for the whole table: small request limits, and a small max_body_bytes."""
    main_engine = engines("llama", **MAIN_LIMITS)
    small_engine = engines("llama", max_body_bytes=SMALL_BODY)
    apps = {
        "main": create_app(main_engine.settings, engine=main_engine),
        "small": create_app(small_engine.settings, engine=small_engine),
    }
    with LiveServer(apps["main"]) as main, LiveServer(apps["small"]) as small:
        with httpx.Client(base_url=main.url) as main_client, httpx.Client(base_url=small.url) as small_client:
            tokenizer = main_engine.loaded.tokenizer
            verbalizer = label_ids(lambda words: tokenizer(words, add_special_tokens=False)["input_ids"], "causal")
            yield {
                "apps": apps,
                "clients": {"main": main_client, "small": small_client},
                "info": main_engine.info,
                "body": evaluate_body("causal", verbalizer, [{"soft_prompt": soft(2)}], texts=TEXTS[:2]),
            }


Send = Callable[[httpx.Client, dict, ModelInfo, dict], httpx.Response]


@dataclass(frozen=True)
class Bad:
    send: Send
    status: int
    param: str | None = None
    code: str = "invalid_request"
    server: str = "main"


def ev(mutate: Callable[[dict, ModelInfo], None]) -> Send:
    """POST /v1/evaluate with the valid body changed in place by `mutate(body, info)`."""

    def send(client, body, info, headers):
        mutate(body, info)
        return client.post("/v1/evaluate", json=body, headers=headers)

    return send


def raw(method: str, url: str, content=None, json_body=None, content_type: str | None = "application/json") -> Send:
    def send(client, body, info, headers):
        if content_type is not None:
            headers = {**headers, "content-type": content_type}
        data = content(body) if callable(content) else content
        response = client.request(method, url, content=data, json=json_body, headers=headers)
        expected = content_type or ("application/json" if json_body is not None else None)
        assert response.request.headers.get("content-type") == expected  # the case sends what it claims
        return response

    return send


def setter(path: str, value) -> Callable[[dict, ModelInfo], None]:
    """Set a dotted path (`candidates.0.soft_prompt`); a callable value gets `info`."""

    def mutate(body, info):
        *parents, last = path.split(".")
        target = body
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        value_now = value(info) if callable(value) else value
        if isinstance(target, list):
            target[int(last)] = value_now
        else:
            target[last] = value_now

    return mutate


def drop(key: str) -> Callable[[dict, ModelInfo], None]:
    return lambda body, info: body.pop(key)


def too_big(body: dict) -> bytes:
    return json.dumps({**body, "examples": [{"text_a": "great " * 500, "label": 0}] * 2}).encode()


def chunked(body: dict):
    payload = too_big(body)
    for start in range(0, len(payload), 1000):
        yield payload[start : start + 1000]


LONG_TEXT = " ".join(["the movie was great and fun to watch"] * 30)  # far over the 128-token limit

SOFT = "candidates.0.soft_prompt"
BAD_INPUTS = {
    # 400: not a JSON object
    "malformed-json": Bad(raw("POST", "/v1/evaluate", b'{"template": '), 400),
    "malformed-json-tokenize": Bad(raw("POST", "/v1/tokenize", b'{"texts": ["a"'), 400),
    "array-body": Bad(raw("POST", "/v1/evaluate", json_body=[1, 2]), 400),
    "string-body": Bad(raw("POST", "/v1/evaluate", json_body="hello"), 400),
    "null-body": Bad(raw("POST", "/v1/evaluate", b"null"), 400),
    "empty-body": Bad(raw("POST", "/v1/evaluate", b""), 400),
    "missing-content-type": Bad(
        raw("POST", "/v1/evaluate", lambda b: json.dumps(b), content_type=None), 415, code="unsupported_media_type"
    ),
    "text-plain": Bad(
        raw("POST", "/v1/evaluate", lambda b: json.dumps(b), content_type="text/plain"),
        415,
        code="unsupported_media_type",
    ),
    # 422: soft prompts
    "nan": Bad(ev(setter(SOFT, non_finite(np.nan))), 422, SOFT + ".data"),
    "inf": Bad(ev(setter(SOFT, non_finite(np.inf))), 422, SOFT + ".data"),
    "-inf-float16": Bad(ev(setter(SOFT, non_finite(-np.inf, "float16"))), 422, SOFT + ".data"),
    "wrong-hidden-size": Bad(ev(setter(SOFT, soft(2, HIDDEN // 2))), 422, SOFT + ".shape"),
    "3d-soft-prompt": Bad(ev(setter(SOFT, soft(2, shape=[1, 2, HIDDEN]))), 422, SOFT + ".shape"),
    "negative-dims": Bad(ev(setter(SOFT, soft(2, shape=[-2, -HIDDEN]))), 422, SOFT + ".shape"),
    "int32-soft-prompt": Bad(ev(setter(SOFT, {**soft(2), "dtype": "int32"})), 422, SOFT + ".dtype"),
    "float64-dtype": Bad(ev(setter(SOFT + ".dtype", "float64")), 422, SOFT + ".dtype"),
    "base64-wrong-length": Bad(ev(setter(SOFT, soft(2, shape=[3, HIDDEN]))), 422, SOFT + ".data"),
    "non-base64": Bad(ev(setter(SOFT + ".data", "not base64!")), 422, SOFT + ".data"),
    "rows-vs-token-ids": Bad(ev(setter("candidates.0.prompt_token_ids", [5, 6, 7])), 422, SOFT + ".shape"),
    "prompt-too-long": Bad(ev(setter("candidates.0", {"prompt_token_ids": [5] * 257})), 422, "candidates.0"),
    # 422: token ids
    "verbalizer-id-over-vocab": Bad(ev(setter("verbalizer.1", lambda info: [info.vocab_size])), 422, "verbalizer.1.0"),
    "verbalizer-second-word-over-vocab": Bad(
        ev(setter("verbalizer.0", lambda info: [5, info.vocab_size + 7])), 422, "verbalizer.0.1"
    ),
    "verbalizer-negative-id": Bad(ev(setter("verbalizer.1", [-1])), 422, "verbalizer.1.0"),
    "verbalizer-empty-class": Bad(ev(setter("verbalizer.1", [])), 422, "verbalizer.1"),
    "verbalizer-one-class": Bad(ev(setter("verbalizer", [[5]])), 422, "verbalizer"),
    "prompt-id-over-vocab": Bad(
        ev(setter("candidates.0", lambda info: {"prompt_token_ids": [5, info.vocab_size]})),
        422,
        "candidates.0.prompt_token_ids.1",
    ),
    "prompt-id-negative": Bad(
        ev(setter("candidates.0", {"prompt_token_ids": [5, -1]})), 422, "candidates.0.prompt_token_ids.1"
    ),
    # 422: templates
    "template-unknown-slot": Bad(ev(setter("template", "{prompt}{text_a} {foo}{mask}")), 422, "template"),
    "template-no-mask": Bad(ev(setter("template", "{prompt}{text_a} It was")), 422, "template"),
    "template-two-masks": Bad(ev(setter("template", "{prompt}{text_a}{mask}{mask}")), 422, "template"),
    "template-unbalanced-brace": Bad(ev(setter("template", "{prompt}{text_a {mask}")), 422, "template"),
    "template-text-after-mask-causal": Bad(ev(setter("template", "{prompt}{text_a} It was{mask} .")), 422, "template"),
    # 422: examples and labels
    "label-over-classes": Bad(ev(setter("examples.0.label", 2)), 422, "examples.0.label"),
    "labels-not-all-or-none": Bad(ev(setter("examples.1.label", None)), 422, "examples.1.label"),
    "text-b-missing": Bad(ev(setter("template", "{prompt}{text_a} {text_b}{mask}")), 422, "examples.0.text_b"),
    "prompt-without-slot": Bad(ev(setter("template", "{text_a}{mask}")), 422, "candidates.0"),
    "label-over-protocol-max": Bad(ev(setter("examples.0.label", 256)), 422, "examples.0.label"),
    "label-negative": Bad(ev(setter("examples.1.label", -1)), 422, "examples.1.label"),
    "text-a-not-a-string": Bad(ev(setter("examples.0.text_a", 3)), 422, "examples.0.text_a"),
    "over-long-example": Bad(ev(setter("examples.1.text_a", LONG_TEXT)), 422, "examples.1"),
    # 422: fields and the server's limits
    "unknown-top-level-field": Bad(ev(setter("foo", 1)), 422, "foo"),
    "unknown-candidate-field": Bad(ev(setter("candidates.0.foo", 1)), 422, "candidates.0.foo"),
    "unknown-example-field": Bad(ev(setter("examples.0.txt", "x")), 422, "examples.0.txt"),
    "missing-template": Bad(ev(drop("template")), 422, "template"),
    "no-candidates": Bad(ev(setter("candidates", [])), 422, "candidates"),
    "over-max-candidates": Bad(ev(setter("candidates", [{}, {}, {}])), 422, "candidates"),
    "over-max-examples": Bad(ev(setter("examples", [{"text_a": "fun", "label": 0}] * 4)), 422, "examples"),
    "tokenize-no-texts": Bad(raw("POST", "/v1/tokenize", json_body={"texts": []}, content_type=None), 422, "texts"),
    "tokenize-texts-not-a-list": Bad(
        raw("POST", "/v1/tokenize", json_body={"texts": "a"}, content_type=None), 422, "texts"
    ),
    "tokenize-unknown-field": Bad(
        raw("POST", "/v1/tokenize", json_body={"texts": ["a"], "foo": 1}, content_type=None), 422, "foo"
    ),
    "tokenize-over-max-texts": Bad(
        raw("POST", "/v1/tokenize", json_body={"texts": ["a"] * 4}, content_type=None), 422, "texts"
    ),
    # 413, 404, 405
    "body-over-max-bytes": Bad(raw("POST", "/v1/evaluate", too_big), 413, code="payload_too_large", server="small"),
    "chunked-body-over-max-bytes": Bad(
        raw("POST", "/v1/evaluate", chunked), 413, code="payload_too_large", server="small"
    ),
    "unknown-route": Bad(raw("GET", "/v1/nope"), 404, code="not_found"),
    "unknown-version": Bad(raw("GET", "/v2/health"), 404, code="not_found"),
    "unknown-sub-route": Bad(raw("POST", "/v1/evaluate/now", b"{}"), 404, code="not_found"),
    "get-evaluate": Bad(raw("GET", "/v1/evaluate"), 405),
    "post-health": Bad(raw("POST", "/v1/health", b"{}"), 405),
    "delete-model": Bad(raw("DELETE", "/v1/model"), 405),
}


CASES = [pytest.param(bad, id=key) for key, bad in BAD_INPUTS.items()]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_gets_its_status_code_and_param_and_is_not_charged(table_servers, case: Bad, request):
    client, app = table_servers["clients"][case.server], table_servers["apps"][case.server]
    request_id = f"case-{request.node.callspec.id}"[:64]
    used = app.state.budget.used
    response = case.send(
        client, copy.deepcopy(table_servers["body"]), table_servers["info"], {"X-Request-ID": request_id}
    )
    error = assert_error(response, case.status, case.code, case.param)
    assert error["request_id"] == request_id
    if case.status == 422 and error["details"] is not None:  # pydantic errors: every one, with its param
        assert error["details"]["errors"][0] == {"param": case.param, "message": error["message"]}
    if case.status == 413:
        assert error["details"] == {"max_body_bytes": SMALL_BODY}
    if case.status == 405:
        assert response.headers["allow"]
    assert app.state.budget.used == used  # nothing was charged
    assert client.get("/v1/health").status_code == 200  # and the same connection pool still works


def test_valid_body_of_the_table_succeeds_and_the_server_keeps_serving(table_servers):
    """After every bad request above: still healthy, nothing charged, and the table's base body is valid."""
    for name in ("main", "small"):
        client = table_servers["clients"][name]
        assert client.get("/v1/health").json()["status"] == "ok"
        assert client.get("/v1/model").status_code == 200
        assert table_servers["apps"][name].state.budget.used == 0
    response = table_servers["clients"]["main"].post("/v1/evaluate", json=table_servers["body"])
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["budget_remaining"] == MAIN_LIMITS["budget"] - 1
    table_servers["apps"]["main"].state.budget.refund(1)  # leave the module's budget as found
    small = table_servers["clients"]["small"].post("/v1/evaluate", json=table_servers["body"])
    assert small.status_code == 200 and small.json()["usage"]["budget_remaining"] is None


# ----------------------------------------------------------------------------------------------- budget


def test_budget_is_reserved_per_candidate_and_exhaustion_is_402(live_server, engines):
    tokenizer = engines("llama", budget=3).loaded.tokenizer
    verbalizer = label_ids(lambda words: tokenizer(words, add_special_tokens=False)["input_ids"], "causal")
    two = evaluate_body("causal", verbalizer, [{}, {"soft_prompt": soft(2)}])
    one = evaluate_body("causal", verbalizer, [{"prompt_token_ids": [5]}])
    with live_server("llama", budget=3) as server, httpx.Client(base_url=server.url) as client:
        first = client.post("/v1/evaluate", json=two)
        assert first.status_code == 200 and first.json()["usage"]["budget_remaining"] == 1
        refused = client.post("/v1/evaluate", json=two)
        error = assert_error(refused, 402, "budget_exhausted")
        assert error["details"] == {"requested": 2, "remaining": 1}
        bad = copy.deepcopy(two)
        bad["candidates"][1]["soft_prompt"] = non_finite(np.nan)
        assert_error(client.post("/v1/evaluate", json=bad), 422, "invalid_request", "candidates.1.soft_prompt.data")
        last = client.post("/v1/evaluate", json=one)
        assert last.status_code == 200 and last.json()["usage"]["budget_remaining"] == 0
        error = assert_error(client.post("/v1/evaluate", json=one), 402, "budget_exhausted")
        assert error["details"] == {"requested": 1, "remaining": 0}
        tokenized = client.post("/v1/tokenize", json={"texts": ["fun"]})  # tokenize is free
        assert tokenized.status_code == 200
        assert client.get("/v1/health").status_code == 200


# ----------------------------------------------------------------------------------------------- request ids


@pytest.mark.parametrize("given", ["abc-123", "A.b_C-9", "x" * 64])
def test_a_sane_request_id_is_echoed_in_headers_and_bodies(live_server, given):
    with live_server("llama") as server, httpx.Client(base_url=server.url, headers={"X-Request-ID": given}) as client:
        assert client.get("/v1/health").headers["x-request-id"] == given
        error = assert_error(
            client.post("/v1/evaluate", json={"template": "{text_a}"}), 422, "invalid_request", "template"
        )
        assert error["request_id"] == given
        assert assert_error(client.get("/v1/nope"), 404, "not_found")["request_id"] == given
        response = client.post("/v1/evaluate", json=evaluate_body("causal", [[5], [6]], [{}]))
        assert response.status_code == 200 and response.json()["request_id"] == given


@pytest.mark.parametrize("given", [None, "", "has space", "x" * 65, "semi;colon", "slash/es", "new\tline"])
def test_an_absent_or_unsafe_request_id_is_replaced(live_server, given):
    headers = {} if given is None else {"X-Request-ID": given}
    with live_server("llama") as server, httpx.Client(base_url=server.url) as client:
        seen = set()
        for _ in range(2):
            health = client.get("/v1/health", headers=headers)
            assert GENERATED_ID.match(health.headers["x-request-id"]), health.headers
            seen.add(health.headers["x-request-id"])
        assert len(seen) == 2  # a fresh id per request
        error = assert_error(
            client.post("/v1/evaluate", json={"foo": 1}, headers=headers), 422, "invalid_request", "candidates"
        )
        assert GENERATED_ID.match(error["request_id"]) and error["request_id"] != given
        response = client.post("/v1/evaluate", json=evaluate_body("causal", [[5], [6]], [{}]), headers=headers)
        assert response.json()["request_id"] == response.headers["x-request-id"]
        assert GENERATED_ID.match(response.json()["request_id"])


@pytest.fixture
def exploding_client(engines, monkeypatch):
    """A server whose forward pass fails: 500 responses (not raised into the test)."""
    engine = engines("llama")

    def explode(*args, **kwargs):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.forward, "run", explode)
    app = create_app(engine.settings.model_copy(update={"budget": 5}), engine=engine)
    return app, TestClient(app, raise_server_exceptions=False)


def test_internal_error_is_500_in_the_error_shape_and_not_charged(exploding_client):
    app, client = exploding_client
    response = client.post(
        "/v1/evaluate", json=evaluate_body("causal", [[5], [6]], [{}, {}]), headers={"X-Request-ID": "boom-1"}
    )
    assert response.status_code == 500
    body = response.json()
    assert set(body["error"]) == ERROR_KEYS and body["error"]["code"] == "internal_error"
    assert body["error"]["request_id"] == "boom-1"
    assert "RuntimeError" in body["error"]["message"]
    assert app.state.budget.used == 0
    assert client.get("/v1/health").status_code == 200


def test_internal_error_response_carries_the_request_id_header(exploding_client):
    _, client = exploding_client
    response = client.post(
        "/v1/evaluate", json=evaluate_body("causal", [[5], [6]], [{}]), headers={"X-Request-ID": "boom-2"}
    )
    assert response.status_code == 500
    assert response.headers.get("x-request-id") == "boom-2"


# ----------------------------------------------------------------------------------------------- rendering edge


def test_example_with_no_token_before_the_answer_cue_is_rejected(live_server):
    body = {
        "template": "{prompt}{text_a}{mask}",
        "examples": [{"text_a": ""}, {"text_a": "fun"}],
        "verbalizer": [[5], [6]],
        "candidates": [{}],
    }
    with live_server("llama", budget=10) as server, httpx.Client(base_url=server.url) as client:
        assert_error(client.post("/v1/evaluate", json=body), 422, "invalid_request", "examples.0")
        ok = client.post(
            "/v1/evaluate", json={**body, "candidates": [{"soft_prompt": soft(2)}]}
        )  # the prompt precedes the cue
        assert ok.status_code == 200 and ok.json()["usage"]["budget_remaining"] == 9


def test_no_token_before_the_answer_cue_is_rejected_for_every_candidate(live_server):
    body = {
        "template": "{prompt}{text_a}{mask}",
        "examples": [{"text_a": ""}, {"text_a": "fun"}],
        "verbalizer": [[5], [6]],
        "candidates": [{}, {"soft_prompt": soft(2)}],
    }
    with live_server("llama", budget=10) as server, httpx.Client(base_url=server.url) as client:
        response = client.post("/v1/evaluate", json=body)  # today: 200, two calls charged
        assert_error(response, 422, "invalid_request", "examples.0")
        usage = client.post("/v1/evaluate", json={**body, "examples": [{"text_a": "fun"}]}).json()["usage"]
        assert usage["budget_remaining"] == 8  # the bad request above charged nothing
