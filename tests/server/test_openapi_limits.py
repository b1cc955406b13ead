"""The OpenAPI schema agrees with the server (issue 16 item 6): every published cap is the one that answers
422 one past it, booleans are strict, each route documents only the statuses it can answer, a disabled
admin API answers 401, and 415 has its own error code."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from lmaas_server.api.schema import published_caps
from lmaas_server.config import Settings
from lmaas_server.main import create_app
from tests.server.support import assert_error

TEMPLATE = "{prompt}Review: {text_a}\nSentiment:{mask}"
LIMITS = {"max_examples": 6, "max_candidates": 3, "max_prompt_length": 4, "max_projection_elements": 5000,
          "max_classify_texts": 5, "max_classify_chars": 40}  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_model_dirs):
    from lmaas_server.engine import Engine
    from lmaas_server.model_loading import load_model

    settings = Settings(model=str(tiny_model_dirs["llama"]), device="cpu", require_api_key=False, **LIMITS)
    engine = Engine(load_model(settings), settings)
    client = TestClient(create_app(settings, engine=engine))
    yield client, client.get("/openapi.json").json(), settings
    engine.close()


def body_with(array: str, count: int, prompt_id: str = "") -> tuple[str, dict]:
    """A request at `count` items of `array` (the rest valid), and its route."""
    examples = [{"text_a": "fun", "label": 0}]
    evaluate = {"template": TEMPLATE, "examples": examples, "verbalizer": [[1], [2]], "candidates": [{}]}
    if array == "TokenizeRequest.texts":
        return "/v1/tokenize", {"texts": ["fun"] * count}
    if array == "EvaluateRequest.candidates":
        return "/v1/evaluate", {**evaluate, "candidates": [{}] * count}
    if array == "EvaluateRequest.examples":
        return "/v1/evaluate", {**evaluate, "examples": examples * count}
    if array == "InputsSpec.examples":
        return "/v1/inputs", {key: evaluate[key] for key in ("template", "verbalizer")} | {"examples": examples * count}
    if array == "ClassifyRequest.texts":
        return "/v1/classify", {"prompt": prompt_id, "texts": [{"text_a": "fun"}] * count}
    assert array == "Candidate.prompt_token_ids"
    return "/v1/evaluate", {**evaluate, "candidates": [{"prompt_token_ids": [5] * count}]}


@pytest.mark.parametrize("array", [f"{c}.{p}" for c, p in published_caps(Settings(**LIMITS))])
def test_every_published_cap_is_the_enforced_one(served, array):
    client, schema, settings = served
    component, name = array.split(".")
    field = schema["components"]["schemas"][component]["properties"][name]
    cap = next(v["maxItems"] for v in field.get("anyOf", [field]) if v.get("type") == "array")
    assert cap == published_caps(settings)[(component, name)]
    prompt = {"candidate": {}, "template": TEMPLATE, "verbalizer": [[1], [2]], "labels": ["bad", "good"]}
    prompt_id = client.post("/v1/prompts", json=prompt).json()["id"]  # for classify (a server without keys)
    route, at_cap = body_with(array, cap, prompt_id)
    assert client.post(route, json=at_cap).status_code in (200, 201), client.post(route, json=at_cap).text
    route, past = body_with(array, cap + 1, prompt_id)
    param = {"texts": "texts", "candidates": "candidates", "examples": "examples"}.get(name, "candidates.0")
    assert_error(client.post(route, json=past), 422, "invalid_request", param)


def test_the_projection_cap_is_published(served):
    client, schema, settings = served
    spec = schema["components"]["schemas"]["ProjectionSpec"]
    assert spec["x-max-elements"] == settings.max_projection_elements == client.get("/v1/model").json()["limits"][
        "max_projection_elements"
    ]  # fmt: skip
    assert str(settings.max_projection_elements) in spec["description"]


def test_the_classify_text_length_is_published_and_enforced(served):
    client, schema, settings = served
    text = schema["components"]["schemas"]["ClassifyText"]["properties"]["text_a"]
    assert text["maxLength"] == settings.max_classify_chars == client.get("/v1/model").json()["limits"][
        "max_classify_chars"
    ]  # fmt: skip
    prompt = {"candidate": {}, "template": TEMPLATE, "verbalizer": [[1], [2]], "labels": ["bad", "good"]}
    prompt_id = client.post("/v1/prompts", json=prompt).json()["id"]
    at_cap = {"prompt": prompt_id, "texts": [{"text_a": "x" * settings.max_classify_chars}]}
    assert client.post("/v1/classify", json=at_cap).status_code == 200
    past = {"prompt": prompt_id, "texts": [{"text_a": "x" * (settings.max_classify_chars + 1)}]}
    assert_error(client.post("/v1/classify", json=past), 422, "invalid_request", "texts.0.text_a")
    assert "one call per text" in schema["paths"]["/v1/classify"]["post"]["description"].lower()


def test_booleans_are_strict(served):
    client, _, _ = served
    for value in ("yes", 1, "true"):
        response = client.post("/v1/tokenize", json={"texts": ["a"], "return_tokens": value})
        assert_error(response, 422, "invalid_request", "return_tokens")


def test_routes_document_only_their_statuses(served):
    _, schema, _ = served
    health = set(schema["paths"]["/v1/health"]["get"]["responses"])
    assert not health & {"401", "402", "409"}
    evaluate = set(schema["paths"]["/v1/evaluate"]["post"]["responses"])
    assert {"401", "402", "409", "415", "504"} <= evaluate
    assert "400" in schema["paths"]["/v1/admin/keys"]["post"]["responses"]  # bad JSON


def test_a_disabled_admin_api_is_401_and_415_has_its_own_code(served):
    client, _, _ = served
    error = assert_error(client.get("/v1/admin/keys", headers={"Authorization": "Bearer x"}), 401, "unauthorized")
    assert "disabled" in error["message"]
    response = client.post("/v1/evaluate", content=b"{}", headers={"content-type": "text/plain"})
    assert_error(response, 415, "unsupported_media_type")


def test_json_tensors_require_data_and_cross_field_rules_are_documented(served):
    client, schema, _ = served
    components = schema["components"]["schemas"]
    assert "data" in components["Tensor"]["required"]
    soft = {"dtype": "float32", "shape": [1, 32]}  # no data: the schema says so, and the server agrees
    body = {"template": TEMPLATE, "examples": [{"text_a": "fun", "label": 0}], "verbalizer": [[1], [2]],
            "candidates": [{"soft_prompt": soft}]}  # fmt: skip
    assert client.post("/v1/evaluate", json=body).status_code == 422
    assert "either `inputs`" in components["EvaluateRequest"]["description"]
    assert "{mask} exactly once" in components["InputsSpec"]["description"]
