"""Registered inputs (POST/DELETE /v1/inputs), per-layer stds, binary bundle bodies and dynamic batching, over
real HTTP (uvicorn in a thread) and on the engine: handles give the inline request's logits, every error has
its status, code and parameter and is never charged, and concurrent requests share forward passes without
changing anyone's logits."""

from __future__ import annotations

import base64
import json
import socket
import struct
import threading
import time

import httpx
import numpy as np
import pytest
import torch

from lmaas_protocol import (
    BUNDLE_MEDIA_TYPE,
    Candidate,
    ErrorResponse,
    EvaluateRequest,
    Example,
    InputsSpec,
    LayerStdRequest,
    LowRankOffset,
    ModelInfo,
    Projected,
    ProjectionSpec,
    Tensor,
    decode_bundle,
    encode_bundle,
)
from lmaas_server.budget import CallBudget
from tests.support.tiny_models import HIDDEN, LAYERS

TEMPLATES = {
    "masked": "{prompt} . {text_a} . It was {mask} .",
    "causal": "Review: {text_a}\n{prompt}Sentiment:{mask}",  # text before the prompt: cacheable
    "causal_front": "{prompt}Review: {text_a}\nSentiment:{mask}",  # prefix placement
}
TEXTS = ["the movie was great", "a bad film , boring and dull .", "fun to watch", "thin plot"]
ERROR_KEYS = {"code", "message", "param", "request_id", "details"}
BUDGET = 50


# ----------------------------------------------------------------------------------------------- helpers


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
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    ErrorResponse.model_validate(body)
    error = body["error"]
    assert error["code"] == code, error
    assert error["param"] == param, error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["request_id"] == response.headers["x-request-id"]
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


# ----------------------------------------------------------------------------------------------- registering inputs


@pytest.mark.parametrize(
    ("kind", "template", "cacheable", "reason_word"),
    [
        ("llama", TEMPLATES["causal"], True, "computed once"),
        ("gpt2", TEMPLATES["causal"], True, "computed once"),
        ("llama", TEMPLATES["causal_front"], False, "prefix placement"),
        ("gpt2", TEMPLATES["causal_front"], False, "prefix placement"),
        ("bert", TEMPLATES["masked"], False, "masked"),
        ("roberta", "{text_a} . {prompt} It was {mask} .", False, "masked"),
    ],
)
def test_register_inputs_reports_the_handle_and_the_prefix_cache(
    live_server, engines, kind, template, cacheable, reason_word
):
    engine = engines(kind, budget=BUDGET)
    body = inputs_body(engine, template)
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        response = client.post("/v1/inputs", json=body)
        assert response.status_code == 201, response.text
        registered = response.json()
        assert set(registered) == {"handle", "examples", "tokens", "prefix_cache", "prefix_cache_reason"}
        assert registered["handle"].startswith("inp_") and len(registered["handle"]) > 16
        assert registered["examples"] == len(TEXTS)
        rendered = engine.renderer.render(template, [Example(**e) for e in body["examples"]], 0, False)
        assert registered["tokens"] == sum(len(e.ids) for e in rendered)
        if engine.causal:  # independent count: the text around the slot, tokenized as the template cuts it
            before, after = (p.split("{mask}")[0] for p in template.split("{prompt}"))
            tok = engine.loaded.tokenizer
            expected = sum(
                len(tok(before.format(text_a=t), add_special_tokens=False)["input_ids"]) * (before != "")
                + len(tok(after.format(text_a=t), add_special_tokens=False)["input_ids"])
                for t in TEXTS
            )
            assert registered["tokens"] == expected
        assert registered["prefix_cache"] is cacheable
        assert reason_word in registered["prefix_cache_reason"]
        second = client.post("/v1/inputs", json=body).json()
        assert second["handle"] != registered["handle"]  # every registration is a new handle
        # registering is free
        assert remaining_after_one_call(client, {"inputs": registered["handle"]}) == BUDGET - 1
        for handle in (registered["handle"], second["handle"]):
            assert client.delete(f"/v1/inputs/{handle}").status_code == 204


@pytest.mark.parametrize("kind", ["bert", "roberta", "llama", "gpt2"])
def test_evaluate_by_handle_equals_the_inline_request(live_server, engines, kind):
    engine = engines(kind, budget=BUDGET)
    body = inputs_body(engine)
    candidates = candidates_json()
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        handle = client.post("/v1/inputs", json=body).json()["handle"]
        by_handle = client.post("/v1/evaluate", json={"inputs": handle, "candidates": candidates})
        inline = client.post("/v1/evaluate", json={**body, "candidates": candidates})
        assert by_handle.status_code == inline.status_code == 200, (by_handle.text, inline.text)
        np.testing.assert_allclose(logits_of(by_handle.json()), logits_of(inline.json()), atol=1e-5)
        for a, b in zip(by_handle.json()["results"], inline.json()["results"], strict=True):
            assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["accuracy"] == b["accuracy"]
        usage_handle, usage_inline = by_handle.json()["usage"], inline.json()["usage"]
        assert usage_handle["calls"] == usage_inline["calls"] == len(candidates)
        assert usage_handle["tokens"] == usage_inline["tokens"] and usage_handle["examples"] == len(TEXTS)
        assert usage_inline["budget_remaining"] == BUDGET - 2 * len(candidates)
        # one candidate at a time, by handle, gives the same again (causal: the cached text is reused)
        for i, candidate in enumerate(candidates):
            single = client.post("/v1/evaluate", json={"inputs": handle, "candidates": [candidate]}).json()
            np.testing.assert_allclose(logits_of(single)[0], logits_of(inline.json())[i], atol=1e-5)
        # named projections work with a handle
        spec = {"seed": 3, "scale": 0.1, "dim": 20, "shape": [2, HIDDEN]}
        z = tensor_json(normal(5, 20))
        projected = client.post(
            "/v1/evaluate",
            json={
                "inputs": handle,
                "projections": {"p": spec},
                "candidates": [{"soft_prompt": {"z": z, "projection": "p"}}],
            },
        )
        inline_projected = client.post(
            "/v1/evaluate", json={**body, "candidates": [{"soft_prompt": {"z": z, "projection": spec}}]}
        )
        np.testing.assert_allclose(logits_of(projected.json()), logits_of(inline_projected.json()), atol=1e-5)
        client.delete(f"/v1/inputs/{handle}")


def test_handle_errors_have_their_codes_and_charge_nothing(live_server, engines):
    engine = engines("llama", budget=BUDGET)
    body = inputs_body(engine)
    no_slot = inputs_body(engine, "Review: {text_a}\nSentiment:{mask}")
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        handle = client.post("/v1/inputs", json=body).json()["handle"]
        soft = {"soft_prompt": tensor_json(normal(1, 2, HIDDEN))}
        # a handle and inline inputs together
        for extra in (
            {"template": body["template"]},
            {"examples": body["examples"]},
            {"verbalizer": body["verbalizer"]},
        ):
            both = client.post("/v1/evaluate", json={"inputs": handle, "candidates": [soft], **extra})
            assert_error(both, 422, "invalid_request", "inputs")
        # neither
        assert_error(client.post("/v1/evaluate", json={"candidates": [soft]}), 422, "invalid_request", "template")
        # unknown
        for unknown in ("inp_doesnotexist", "x"):
            missing = client.post("/v1/evaluate", json={"inputs": unknown, "candidates": [soft]})
            assert_error(missing, 404, "not_found", "inputs")
        assert_error(
            client.post("/v1/evaluate", json={"inputs": "y" * 129, "candidates": [{}]}),
            422,
            "invalid_request",
            "inputs",
        )
        # a template without {prompt}: fine for the empty prompt, not for a prompt or an offset
        bare = client.post("/v1/inputs", json=no_slot)
        assert bare.status_code == 201
        bare_handle = bare.json()["handle"]
        assert_error(
            client.post("/v1/evaluate", json={"inputs": bare_handle, "candidates": [soft]}),
            422,
            "invalid_request",
            "candidates.0",
        )
        offset = {"embedding_offset": {"a": tensor_json(normal(0, 3, 2)), "b": tensor_json(normal(1, 2, HIDDEN))}}
        assert_error(
            client.post("/v1/evaluate", json={"inputs": bare_handle, "candidates": [{}, offset]}),
            422,
            "invalid_request",
            "candidates.1",
        )
        # bad candidates against the model, by handle
        wide = {"soft_prompt": tensor_json(normal(1, 2, HIDDEN + 1))}
        assert_error(
            client.post("/v1/evaluate", json={"inputs": handle, "candidates": [wide]}),
            422,
            "invalid_request",
            "candidates.0.soft_prompt.shape",
        )
        # bad registrations
        causal_mask_inside = {**body, "template": "{text_a} {mask} and more"}
        assert_error(client.post("/v1/inputs", json=causal_mask_inside), 422, "invalid_request", "template")
        over_vocab = {**body, "verbalizer": [[5], [engine.info.vocab_size]]}
        assert_error(client.post("/v1/inputs", json=over_vocab), 422, "invalid_request", "verbalizer.1.0")
        too_long = {**body, "examples": [{"text_a": "fun", "label": 0}, {"text_a": "great " * 400, "label": 1}]}
        assert_error(client.post("/v1/inputs", json=too_long), 422, "invalid_request", "examples.1")
        assert_error(client.post("/v1/inputs", json={**body, "foo": 1}), 422, "invalid_request", "foo")
        assert_error(
            client.post("/v1/inputs", content=b"{}", headers={"content-type": "text/plain"}), 415, "invalid_request"
        )
        # delete: 204, then 404; the deleted handle is then unknown
        assert client.delete(f"/v1/inputs/{bare_handle}").status_code == 204
        assert_error(client.delete(f"/v1/inputs/{bare_handle}"), 404, "not_found", "handle")
        assert_error(
            client.post("/v1/evaluate", json={"inputs": bare_handle, "candidates": [{}]}), 404, "not_found", "inputs"
        )
        assert_error(client.delete("/v1/inputs/inp_never"), 404, "not_found", "handle")
        # layer_std on an unknown handle
        assert_error(client.post("/v1/layer_std", json={"inputs": bare_handle}), 404, "not_found", "inputs")
        # none of the above was charged
        assert remaining_after_one_call(client, {"inputs": handle}) == BUDGET - 1
        client.delete(f"/v1/inputs/{handle}")


def test_evicted_handles_are_gone(live_server, engines):
    engine = engines("llama", budget=BUDGET, max_input_handles=1)
    with (
        live_server("llama", budget=BUDGET, max_input_handles=1) as server,
        httpx.Client(base_url=server.url) as client,
    ):
        first = client.post("/v1/inputs", json=inputs_body(engine)).json()["handle"]
        ok = client.post("/v1/evaluate", json={"inputs": first, "candidates": [{}]})
        assert ok.status_code == 200
        second = client.post("/v1/inputs", json=inputs_body(engine, texts=TEXTS[:2])).json()["handle"]
        assert len(engine.inputs) == 1
        error = assert_error(
            client.post("/v1/evaluate", json={"inputs": first, "candidates": [{}, {}]}), 410, "gone", "inputs"
        )
        assert "register them again" in error["message"]
        assert_error(client.post("/v1/layer_std", json={"inputs": first}), 410, "gone", "inputs")
        again = client.post("/v1/evaluate", json={"inputs": second, "candidates": [{}]})
        assert again.status_code == 200 and again.json()["usage"]["budget_remaining"] == BUDGET - 2
        client.delete(f"/v1/inputs/{second}")


def test_prefix_cache_reason_when_the_server_disables_it(engines):
    engine = engines("llama", prefix_cache=False)
    registered = engine.register_inputs(InputsSpec.model_validate(inputs_body(engine)))
    assert registered.prefix_cache is False and "disabled" in registered.prefix_cache_reason
    engine.inputs.delete(registered.handle)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_manual_baseline_by_handle_with_the_prompt_right_before_the_answer_cue(live_server, engines, kind):
    engine = engines(kind, budget=BUDGET)
    body = inputs_body(engine, "Review: {text_a}\nSentiment:{prompt}{mask}")
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        inline = client.post("/v1/evaluate", json={**body, "candidates": [{}]})  # one candidate: the plain path
        assert inline.status_code == 200, inline.text
        handle = client.post("/v1/inputs", json=body).json()["handle"]
        by_handle = client.post("/v1/evaluate", json={"inputs": handle, "candidates": [{}]})
        engine.inputs.delete(handle)
        assert by_handle.status_code == 200, by_handle.text
        np.testing.assert_allclose(logits_of(by_handle.json()), logits_of(inline.json()), atol=1e-5)


def test_truncate_next_to_a_handle_is_rejected(live_server, engines):
    engine = engines("llama", budget=BUDGET)
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        handle = client.post("/v1/inputs", json=inputs_body(engine)).json()["handle"]
        response = client.post("/v1/evaluate", json={"inputs": handle, "truncate": True, "candidates": [{}]})
        client.delete(f"/v1/inputs/{handle}")
        assert_error(response, 422, "invalid_request", "truncate")


# ----------------------------------------------------------------------------------------------- layer std


@pytest.mark.parametrize("kind", ["bert", "llama", "gpt2"])
def test_layer_std_measures_every_layer_and_costs_one_call(live_server, engines, kind):
    engine = engines(kind, budget=BUDGET)
    body = inputs_body(engine)
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        info = ModelInfo.model_validate(client.get("/v1/model").json())
        assert info.num_layers == LAYERS and len(info.layer_std) == info.num_layers
        assert info.layer_std[0] == info.embedding_std
        assert all(isinstance(v, float) and v > 0 for v in info.layer_std)
        handle = client.post("/v1/inputs", json=body).json()["handle"]
        response = client.post("/v1/layer_std", json={"inputs": handle})
        assert response.status_code == 200, response.text
        measured = response.json()
        assert len(measured["layer_std"]) == info.num_layers
        assert all(isinstance(v, float) and v > 0 for v in measured["layer_std"])
        assert measured["usage"]["calls"] == 1 and measured["usage"]["examples"] == len(TEXTS)
        assert measured["usage"]["budget_remaining"] == BUDGET - 1
        # the same stds from Hugging Face's own hidden states (entry i >= 1: the input of layer i; entry 0 is
        # checked against the word embeddings below)
        rendered = engine.inputs.get(handle).variant(engine.renderer, 0, 0).rendered
        states = []
        with torch.no_grad():
            for example in rendered:
                out = engine.loaded.model(input_ids=torch.tensor([example.ids]), output_hidden_states=True)
                states.append([h[0] for h in out.hidden_states[: info.num_layers]])
        expected = [clipped_std(torch.cat([s[i] for s in states])) for i in range(1, info.num_layers)]
        np.testing.assert_allclose(measured["layer_std"][1:], expected, rtol=1e-4)
        assert remaining_after_one_call(client, {"inputs": handle}) == BUDGET - 2
        assert_error(client.post("/v1/layer_std", json={"inputs": handle, "foo": 1}), 422, "invalid_request", "foo")
        client.delete(f"/v1/inputs/{handle}")


@pytest.mark.parametrize("kind", ["llama", "bert", "gpt2"])
def test_measured_layer_std_0_is_the_word_embeddings_std(engines, kind):
    """ModelInfo.layer_std: "i = 0: the word embeddings" (where deep_prompt[0] and soft prompts are added);
    POST /v1/layer_std is documented "as ModelInfo.layer_std but on these inputs"."""
    engine = engines(kind)
    registered = engine.register_inputs(InputsSpec.model_validate(inputs_body(engine)))
    measured = engine.measure_layer_std(LayerStdRequest(inputs=registered.handle), CallBudget(None))
    rendered = engine.inputs.get(registered.handle).variant(engine.renderer, 0, 0).rendered
    with torch.no_grad():
        words = engine.loaded.model.get_input_embeddings()(torch.tensor([i for e in rendered for i in e.ids]))
    engine.inputs.delete(registered.handle)
    assert measured.layer_std[0] == pytest.approx(clipped_std(words), rel=1e-3)


# ----------------------------------------------------------------------------------------------- bundle bodies


def rich_request(engine) -> EvaluateRequest:
    body = inputs_body(engine)
    spec = ProjectionSpec(seed=11, scale=0.05, dim=64, shape=[4, HIDDEN])
    return EvaluateRequest(
        template=body["template"],
        examples=[Example(**e) for e in body["examples"]],
        verbalizer=body["verbalizer"],
        projections={"bbt": spec},
        candidates=[
            Candidate(),
            Candidate(soft_prompt=Tensor.from_numpy(normal(1, 3, HIDDEN))),
            Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(2, 64)), projection="bbt")),
            Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(3, 64), dtype="float16"), projection="bbt")),
            Candidate(
                prompt_token_ids=[5, 6, 7, 8],
                deep_prompt=[None, Projected(z=Tensor.from_numpy(normal(4, 64)), projection="bbt")],
            ),
            Candidate(
                prompt_token_ids=[5],
                embedding_offset=LowRankOffset(
                    a=Tensor.from_numpy(normal(5, 7, 2)),
                    b=Tensor.from_numpy(normal(6, 2, HIDDEN), dtype="float16"),
                    scale=0.4,
                ),
            ),
        ],
    )


def bundle(document: bytes, buffers: list[bytes], lengths: list[int] | None = None) -> bytes:
    lengths = [len(b) for b in buffers] if lengths is None else lengths
    return b"".join(
        [b"LMB1", struct.pack("<I", len(document)), document, struct.pack("<I", len(lengths)),
         struct.pack(f"<{len(lengths)}Q", *lengths), *buffers]
    )  # fmt: skip


BUNDLE_HEADERS = {"content-type": BUNDLE_MEDIA_TYPE}


@pytest.mark.parametrize("kind", ["roberta", "llama"])
def test_bundle_bodies_give_the_json_bodies_results(live_server, engines, kind):
    engine = engines(kind, budget=BUDGET)
    request = rich_request(engine)
    as_json = request.model_dump_json(exclude_none=True)
    as_bundle = encode_bundle(request)
    assert len(as_bundle) < len(as_json)
    with live_server(kind, budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        by_json = client.post("/v1/evaluate", content=as_json, headers={"content-type": "application/json"})
        by_bundle = client.post("/v1/evaluate", content=as_bundle, headers=BUNDLE_HEADERS)
        assert by_json.status_code == by_bundle.status_code == 200, (by_json.text, by_bundle.text)
        np.testing.assert_array_equal(logits_of(by_bundle.json()), logits_of(by_json.json()))
        assert by_bundle.json()["usage"]["calls"] == len(request.candidates)
        # the media type may carry parameters and any case
        upper = client.post(
            "/v1/evaluate", content=as_bundle, headers={"content-type": "Application/X-LMAAS-Bundle; v=1"}
        )
        assert upper.status_code == 200
        charset = client.post(
            "/v1/evaluate", content=as_json, headers={"content-type": "application/json; charset=utf-8"}
        )
        assert charset.status_code == 200
        # every buffer misaligned by one byte: same results
        document, buffers = decode_bundle(as_bundle)
        shifted = bundle(document + b" ", [bytes(b) for b in buffers])
        np.testing.assert_array_equal(
            logits_of(client.post("/v1/evaluate", content=shifted, headers=BUNDLE_HEADERS).json()),
            logits_of(by_json.json()),
        )
        # registering inputs as a bundle works too (no tensors: no buffers)
        registered = client.post(
            "/v1/inputs", content=encode_bundle(InputsSpec.model_validate(inputs_body(engine))), headers=BUNDLE_HEADERS
        )
        assert registered.status_code == 201, registered.text
        handle = registered.json()["handle"]
        by_handle = client.post(
            "/v1/evaluate",
            content=encode_bundle(
                EvaluateRequest(inputs=handle, candidates=request.candidates, projections=request.projections)
            ),
            headers=BUNDLE_HEADERS,
        )
        np.testing.assert_allclose(logits_of(by_handle.json()), logits_of(by_json.json()), atol=1e-5)
        client.delete(f"/v1/inputs/{handle}")


def test_malformed_bundles_are_rejected_and_not_charged(live_server, engines):
    engine = engines("llama", budget=BUDGET)
    request = rich_request(engine)
    good = encode_bundle(request)
    document, buffers = decode_bundle(good)
    raw = [bytes(b) for b in buffers]
    soft_ref = "candidates.1.soft_prompt.ref"
    cases = [
        (b"LMB0" + good[4:], 400, None),
        (b"", 400, None),
        (good[:7], 400, None),
        (good[:-1], 400, None),
        (good[: 8 + len(document) + 2], 400, None),
        (good + b"\x00\x00", 400, None),
        (bundle(document, raw, lengths=[len(b) for b in raw[:-1]] + [2**40]), 400, None),
        (bundle(document, raw[:1]), 422, "candidates.2.soft_prompt.z.ref"),  # refs to missing buffers
        (bundle(document, [raw[0][:-4], *raw[1:]]), 422, soft_ref),  # a buffer of the wrong length
        (bundle(document, [raw[0] + b"\x00" * 4, *raw[1:]]), 422, soft_ref),
        (
            bundle(document, [np.full(len(raw[0]) // 4, np.inf, "<f4").tobytes(), *raw[1:]]),
            422,
            "candidates.1.soft_prompt.data",
        ),
        (bundle(b"{not json", []), 400, None),
        (bundle(b"[1, 2]", []), 400, None),
        (bundle(document.replace(b'"candidates"', b'"candidatez"'), raw), 422, "candidates"),
        (good, 415, None),  # a valid bundle sent as octet-stream: see headers below
    ]
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        for i, (payload, status, param) in enumerate(cases):
            headers = {"content-type": "application/octet-stream"} if status == 415 else BUNDLE_HEADERS
            response = client.post("/v1/evaluate", content=payload, headers=headers)
            error = assert_error(response, status, "invalid_request", param)
            if status == 400 and i < 7:
                assert "bundle" in error["message"], error
        # a JSON body may not use buffer references
        as_json = request.model_dump(mode="json", exclude_none=True)
        as_json["candidates"][1]["soft_prompt"] = {"dtype": "float32", "shape": [3, HIDDEN], "ref": 0}
        error = assert_error(client.post("/v1/evaluate", json=as_json), 422, "invalid_request", soft_ref)
        assert "bundle" in error["message"]
        # a JSON body sent with the bundle media type is a malformed bundle
        assert_error(
            client.post("/v1/evaluate", content=request.model_dump_json(), headers=BUNDLE_HEADERS),
            400,
            "invalid_request",
        )
        assert_error(client.post("/v1/inputs", content=b"LMB1", headers=BUNDLE_HEADERS), 400, "invalid_request")
        assert client.get("/v1/health").status_code == 200
        assert remaining_after_one_call(client, inputs_body(engine)) == BUDGET - 1


def test_bbt_population_upload_is_about_4d_bytes_per_candidate(live_server, engines):
    d = 500
    engine = engines("llama", budget=BUDGET)
    spec = ProjectionSpec(seed=7, scale=0.02, dim=d, shape=[5, HIDDEN])
    body = inputs_body(engine)

    def population(n: int, dtype: str) -> EvaluateRequest:
        return EvaluateRequest(
            template=body["template"],
            examples=[Example(**e) for e in body["examples"]],
            verbalizer=body["verbalizer"],
            projections={"bbt": spec},
            candidates=[
                Candidate(soft_prompt=Projected(z=Tensor.from_numpy(normal(i, d), dtype=dtype), projection="bbt"))
                for i in range(n)
            ],
        )

    for dtype, itemsize in (("float32", 4), ("float16", 2)):
        one, twenty = len(encode_bundle(population(1, dtype))), len(encode_bundle(population(20, dtype)))
        per_candidate = (twenty - one) / 19
        assert itemsize * d <= per_candidate <= itemsize * d + 256, (dtype, per_candidate)
        assert twenty <= 20 * (itemsize * d + 256) + one  # the fixed part: the examples, sent once
        json_per_candidate = (
            len(population(20, dtype).model_dump_json(exclude_none=True))
            - len(population(1, dtype).model_dump_json(exclude_none=True))
        ) / 19
        assert json_per_candidate > 1.3 * itemsize * d  # base64
    with live_server("llama", budget=BUDGET) as server, httpx.Client(base_url=server.url) as client:
        request = population(20, "float32")
        by_bundle = client.post("/v1/evaluate", content=encode_bundle(request), headers=BUNDLE_HEADERS)
        assert by_bundle.status_code == 200, by_bundle.text
        by_json = client.post(
            "/v1/evaluate",
            content=request.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json"},
        )
        np.testing.assert_array_equal(logits_of(by_bundle.json()), logits_of(by_json.json()))
        assert by_bundle.json()["usage"]["budget_remaining"] == BUDGET - 20


# ----------------------------------------------------------------------------------------------- dynamic batching


class BlockFirstForward:
    """Wraps engine.forward.run: the first call waits until released; every call records its rows' requests
    (by the number of classes, which differs per request) and the path it took."""

    def __init__(self, engine, monkeypatch):
        self.entered, self.release = threading.Event(), threading.Event()
        self.batches: list[tuple[frozenset[int], bool, int]] = []
        original = engine.forward.run

        def run(batch):
            first = not self.batches
            self.batches.append((frozenset(row.out.shape[0] for row in batch), batch[0].prefix is not None, len(batch)))
            if first:
                self.entered.set()
                assert self.release.wait(30), "never released"
            return original(batch)

        monkeypatch.setattr(engine.forward, "run", run)


def wait_for_queue(engine, depth: int) -> None:
    deadline = time.monotonic() + 30
    while engine.scheduler.queue_depth < depth:
        assert time.monotonic() < deadline, f"queue depth {engine.scheduler.queue_depth}, waiting for {depth}"
        time.sleep(0.002)


def batching_requests(engine) -> list[EvaluateRequest]:
    """Four requests, request i with i + 2 classes (so its rows are recognisable in a batch)."""
    vocab = [
        [engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]]
        for w in (" bad", " great", " fun", " thin", " dull")
    ]

    def make(i: int, template: str, texts: list[str], candidates: list[Candidate]) -> EvaluateRequest:
        return EvaluateRequest(
            template=template,
            examples=[Example(text_a=t) for t in texts],
            verbalizer=vocab[: i + 2],
            candidates=candidates,
        )

    soft = [Candidate(soft_prompt=Tensor.from_numpy(normal(s, 1 + s % 3, HIDDEN))) for s in range(6)]
    offset = Candidate(
        embedding_offset=LowRankOffset(a=Tensor.from_numpy(normal(9, 5, 2)), b=Tensor.from_numpy(normal(10, 2, HIDDEN)))
    )
    return [
        make(0, TEMPLATES["causal"], TEXTS, soft[:2]),  # the one that blocks the worker
        make(
            1,
            TEMPLATES["causal"],
            ["it was terrible", "fun", "as lively an account as seinfeld is deadpan ."],
            soft[2:4],
        ),
        make(2, TEMPLATES["causal_front"], TEXTS[1:], [soft[4]]),  # plain path
        make(3, "Text: {text_a}\nSo it was {prompt}Answer:{mask}", TEXTS[:3], [soft[5], Candidate(), offset]),
    ]


def test_concurrent_requests_share_forward_passes_and_keep_their_logits(engines, monkeypatch):
    engine = engines("llama", max_candidates=63)  # a private engine: its forward pass gets patched
    requests = batching_requests(engine)
    alone = [engine_logits(engine.evaluate(r, CallBudget(None))) for r in requests]
    spy = BlockFirstForward(engine, monkeypatch)
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = engine_logits(engine.evaluate(requests[i], CallBudget(None)))
        except BaseException as exc:  # surfaced below
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    assert spy.entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_for_queue(engine, len(requests) - 1)  # everyone else is waiting for the worker
    spy.release.set()
    for thread in threads:
        thread.join(30)
        assert not thread.is_alive()
    for i, expected in enumerate(alone):
        assert not isinstance(results[i], BaseException), results[i]
        np.testing.assert_allclose(results[i], expected, atol=1e-5)
    first, *later = spy.batches
    assert first[0] == {2}
    # one round for the three waiting requests: one plain and one cached forward pass, each shared
    assert [(owners, cached) for owners, cached, _ in later] == [(frozenset({4, 5}), False), (frozenset({3, 5}), True)]
    rows = {cached: n for _, cached, n in later}
    assert rows == {False: 1 * 3 + 1 * 3, True: 2 * 3 + 2 * 3}  # (candidates x examples) per request
    assert engine.scheduler.batch_sizes == [6, 12]


def test_concurrent_http_clients_share_forward_passes(live_server, engines, monkeypatch):
    engine = engines("llama", max_candidates=62)  # a private engine: its forward pass gets patched
    requests = batching_requests(engine)
    bodies = [r.model_dump_json(exclude_none=True) for r in requests]
    headers = {"content-type": "application/json"}
    with live_server("llama", max_candidates=62) as server:
        with httpx.Client(base_url=server.url) as client:
            alone = [logits_of(client.post("/v1/evaluate", content=b, headers=headers).json()) for b in bodies]
        spy = BlockFirstForward(engine, monkeypatch)
        results: dict[int, object] = {}

        def call(i: int) -> None:
            try:
                with httpx.Client(base_url=server.url, timeout=60) as own:
                    response = own.post("/v1/evaluate", content=bodies[i], headers=headers)
                    results[i] = logits_of(response.json()) if response.status_code == 200 else response.text
            except BaseException as exc:
                results[i] = exc

        threads = [threading.Thread(target=call, args=(i,)) for i in range(len(bodies))]
        threads[0].start()
        assert spy.entered.wait(30)
        for thread in threads[1:]:
            thread.start()
        wait_for_queue(engine, len(bodies) - 1)
        spy.release.set()
        for thread in threads:
            thread.join(60)
            assert not thread.is_alive()
    for i, expected in enumerate(alone):
        assert isinstance(results[i], np.ndarray), results[i]
        np.testing.assert_allclose(results[i], expected, atol=1e-5)
    assert any(len(owners) > 1 for owners, _, _ in spy.batches[1:])
    assert len(spy.batches) == 3


def test_a_failing_request_does_not_fail_the_others_in_its_round(engines, monkeypatch):
    engine = engines("llama", max_candidates=61)
    requests = batching_requests(engine)
    alone = engine_logits(engine.evaluate(requests[1], CallBudget(None)))
    spy = BlockFirstForward(engine, monkeypatch)
    # request 2's rows fail to build on the worker (e.g. an out-of-memory while computing its text cache)
    original_rows = engine._rows

    def rows(prepared, variant, prompts, logits, use_prefix):
        if logits.shape[2] == 4:
            raise RuntimeError("simulated failure")
        return original_rows(prepared, variant, prompts, logits, use_prefix)

    monkeypatch.setattr(engine, "_rows", rows)
    budgets = [CallBudget(10) for _ in requests]
    results: dict[int, object] = {}

    def call(i: int) -> None:
        try:
            results[i] = engine_logits(engine.evaluate(requests[i], budgets[i]))
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=call, args=(i,)) for i in range(3)]
    threads[0].start()
    assert spy.entered.wait(30)
    for thread in threads[1:]:
        thread.start()
    wait_for_queue(engine, 2)
    spy.release.set()
    for thread in threads:
        thread.join(30)
    assert isinstance(results[2], RuntimeError) and budgets[2].used == 0  # refunded
    np.testing.assert_allclose(results[1], alone, atol=1e-5)
    assert budgets[0].used == 2 and budgets[1].used == 2


# ----------------------------------------------------------------------------------------------- robustness


def test_a_500_keeps_the_connection_usable_or_says_it_closes(live_server, engines, monkeypatch):
    engine = engines("llama", max_candidates=60)  # a private engine: its forward pass gets patched

    def explode(batch):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.forward, "run", explode)
    body = json.dumps({**inputs_body(engine), "candidates": [{}]}).encode()
    with live_server("llama", max_candidates=60) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            head = (
                f"POST /v1/evaluate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            ).encode()
            sock.sendall(head + body)
            received = b""
            while b"\r\n\r\n" not in received:
                received += sock.recv(65536)
            header_text, rest = received.split(b"\r\n\r\n", 1)
            headers = dict(line.split(": ", 1) for line in header_text.decode("latin-1").lower().split("\r\n")[1:])
            assert header_text.startswith(b"HTTP/1.1 500")
            while len(rest) < int(headers["content-length"]):
                rest += sock.recv(65536)
            assert json.loads(rest)["error"]["code"] == "internal_error"
            sock.settimeout(1.0)
            try:
                closed = sock.recv(1) == b""
            except TimeoutError:
                closed = False  # still open: the next request may reuse it
            assert not closed or headers.get("connection") == "close", headers
