"""Helpers of the server tests over real HTTP: request bodies, tensors, error checks (tiny models)."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import torch

from lmaas_protocol import ErrorResponse, Tensor
from tests.support.tiny_models import HIDDEN

TEMPLATES = {
    "masked": "{prompt} . {text_a} . It was {mask} .",
    "causal": "Review: {text_a}\n{prompt}Sentiment:{mask}",  # text before the prompt: cacheable
    "causal_front": "{prompt}Review: {text_a}\nSentiment:{mask}",  # prefix placement
}
TEXTS = ["the movie was great", "a bad film , boring and dull .", "fun to watch", "thin plot"]
ERROR_KEYS = {"code", "message", "param", "request_id", "details"}
BUDGET = 50


def family(kind: str) -> str:
    return "causal" if kind in ("llama", "gpt2") else "masked"


def label_ids(engine) -> list[list[int]]:
    words = [" bad", " great"] if engine.causal else ["bad", "great"]
    return [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]


def inputs_body(engine, template: str | None = None, texts=TEXTS) -> dict:
    return {
        "template": template or TEMPLATES[engine.loaded.family],
        "examples": [{"text_a": text, "label": i % 2} for i, text in enumerate(texts)],
        "verbalizer": label_ids(engine),
    }


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, scale, shape).astype(np.float32)


def tensor_json(array: np.ndarray, dtype: str = "float32") -> dict:
    return Tensor.from_numpy(array, dtype=dtype).model_dump()


def candidates_json() -> list[dict]:
    return [
        {},
        {"soft_prompt": tensor_json(normal(1, 3, HIDDEN))},
        {"prompt_token_ids": [5, 6, 7]},
        {"deep_prompt": [None, tensor_json(normal(2, 2, HIDDEN))]},
        {
            "prompt_token_ids": [5],
            "embedding_offset": {
                "a": tensor_json(normal(3, 6, 2)),
                "b": tensor_json(normal(4, 2, HIDDEN)),
                "scale": 0.5,
            },
        },
    ]


def logits_of(response_json: dict) -> np.ndarray:
    out = []
    for result in response_json["results"]:
        shape = result["logits"]["shape"]
        out.append(np.frombuffer(base64.b64decode(result["logits"]["data"]), "<f4").reshape(shape))
    return np.stack(out)


def engine_logits(response) -> np.ndarray:
    return np.stack([r.logits.to_numpy() for r in response.results])


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict:
    """The one error shape, with the request id of the response header."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    ErrorResponse.model_validate(body)
    error = body["error"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["request_id"] == response.headers["x-request-id"], (error, response.headers)
    return error


def remaining_after_one_call(client: httpx.Client, body: dict) -> int:
    """Spend one call and return the budget left (how the tests see that errors charged nothing)."""
    response = client.post("/v1/evaluate", json={**body, "candidates": [{}]})
    assert response.status_code == 200, response.text
    return response.json()["usage"]["budget_remaining"]


def clipped_std(values: torch.Tensor) -> float:
    """BBTv2's statistic, written out here: std after dropping values beyond mean +- 3 std, five rounds."""
    values = values.double().flatten()
    for _ in range(5):
        mean, std = values.mean(), values.std()
        kept = values[(values - mean).abs() <= 3 * std]
        if len(kept) == len(values):
            break
        values = kept
    return float(values.std())
