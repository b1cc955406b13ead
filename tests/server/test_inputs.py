"""Registered inputs (POST/DELETE /v1/inputs) and per-layer stds over real HTTP: handles give the inline
request's logits, every error has its status, code and parameter and is never charged."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch

from lmaas_protocol import (
    Example,
    InputsSpec,
    LayerStdRequest,
    ModelInfo,
)
from lmaas_server.budget import CallBudget
from tests.server.support import (
    BUDGET,
    TEMPLATES,
    TEXTS,
    assert_error,
    candidates_json,
    clipped_std,
    inputs_body,
    logits_of,
    normal,
    remaining_after_one_call,
    tensor_json,
)
from tests.support.tiny_models import HIDDEN, LAYERS

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
        assert second["handle"] == registered["handle"]  # the same set: the same handle (bodies stay replayable)
        other = client.post("/v1/inputs", json={**body, "examples": body["examples"][:1]}).json()
        assert other["handle"] != registered["handle"]
        # registering is free
        assert remaining_after_one_call(client, {"inputs": registered["handle"]}) == BUDGET - 1
        for handle in (registered["handle"], other["handle"]):
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
