"""The vLLM backend against a stand-in vLLM server (tests/support/fake_vllm.py) on the tiny llama: the same label
logits as the transformers backend for every form vLLM can serve, 422 before any charge for the others, metering
unchanged, start-up refusals. Real vLLM: tests/vllm (make test-vllm)."""

from __future__ import annotations

import base64
import io

import httpx
import numpy as np
import pytest
import torch

from lmaas_protocol import EvaluateRequest
from lmaas_runtime import ModelError
from lmaas_server.config import Settings
from lmaas_server.engine import Engine
from lmaas_server.main import create_app
from lmaas_server.metering.budget import CallBudget
from lmaas_server.model_loading import load_model
from tests.conftest import LiveServer
from tests.server.support import TEMPLATES, assert_error, candidates_json, engine_logits, inputs_body
from tests.support.fake_vllm import fake_vllm_app

FORMS = ["none", "soft", "tokens", "deep", "dept"]  # candidates_json() in order
SERVED = [0, 1, 2, 4]  # every form but BBTv2's per-layer deep prompt


@pytest.fixture(scope="module")
def fake_vllm(tiny_model_dirs):
    """`fake_vllm(**options)`: a stand-in vLLM server on the tiny llama (one per set of options, module-wide)."""
    servers: dict = {}

    def start(**options) -> LiveServer:
        key = tuple(sorted(options.items()))
        if key not in servers:
            app = fake_vllm_app(str(tiny_model_dirs["llama"]), **options)
            servers[key] = LiveServer(app).__enter__()
            servers[key].app = app  # its `state.requests`: the bodies the backend sent
        return servers[key]

    yield start
    for server in servers.values():
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def vllm_engine(engines, fake_vllm):
    return engines("llama", backend="vllm", vllm_url=fake_vllm().url, budget=100)


def request(engine, template: str, indices=SERVED) -> EvaluateRequest:
    candidates = [candidates_json()[i] for i in indices]
    return EvaluateRequest.model_validate({**inputs_body(engine, template), "candidates": candidates})


@pytest.mark.parametrize("template", [TEMPLATES["causal"], TEMPLATES["causal_front"]], ids=["suffix", "prefix"])
def test_every_served_form_scores_as_the_transformers_backend(engines, vllm_engine, fake_vllm, template):
    reference = engines("llama")
    want = engine_logits(reference.evaluate(request(reference, template), CallBudget(None)))
    sent = len(fake_vllm().app.state.requests)
    got = engine_logits(vllm_engine.evaluate(request(vllm_engine, template), CallBudget(None)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert (got.argmax(-1) == want.argmax(-1)).all()
    bodies = fake_vllm().app.state.requests[sent:]
    embeds = [b for b in bodies if "prompt_embeds" in b]
    ids = [b for b in bodies if "prompt" in b]
    # soft prompt and DePT rows went as embeddings, the manual and the discrete prompt as token ids
    assert sum(len(b["prompt_embeds"]) for b in embeds) == 2 * len(inputs_body(reference)["examples"])
    assert sum(len(b["prompt"]) for b in ids) == 2 * len(inputs_body(reference)["examples"])
    assert all(b["max_tokens"] == 1 and b["return_tokens_as_token_ids"] for b in bodies)
    tensor = torch.load(io.BytesIO(base64.b64decode(embeds[0]["prompt_embeds"][0])), weights_only=True)
    assert tensor.dim() == 2 and tensor.shape[1] == vllm_engine.hidden_size  # [T, hidden], only its own row


def test_vllm_engine_reports_its_backend_and_serves_no_gateway_prefix_cache(vllm_engine):
    assert vllm_engine.backend.name == "vllm" and vllm_engine.backend.embeds
    assert vllm_engine.info.prefix_cache is False
    assert vllm_engine.max_length <= 127  # the stand-in's max_model_len less the decoded token


def test_deep_prompts_are_refused_over_http_naming_the_form_and_backend_and_not_charged(engines, fake_vllm):
    engine = engines("llama", backend="vllm", vllm_url=fake_vllm().url, budget=10)
    body = {**inputs_body(engine, TEMPLATES["causal"]), "candidates": [candidates_json()[3]]}
    with LiveServer(create_app(engine.settings, engine=engine)) as server, httpx.Client(base_url=server.url) as client:
        before = client.post("/v1/evaluate", json={**body, "candidates": [{}]}).json()["usage"]["budget_remaining"]
        error = assert_error(client.post("/v1/evaluate", json=body), 422, "invalid_request",
                             "candidates.0.deep_prompt")  # fmt: skip
        assert "vLLM backend" in error["message"] and "deep prompts" in error["message"]
        served = {**body, "candidates": [candidates_json()[i] for i in SERVED]}
        response = client.post("/v1/evaluate", json=served)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["calls"] == len(SERVED)  # metered as on the transformers backend
        assert response.json()["usage"]["budget_remaining"] == before - len(SERVED)  # the 422 charged nothing


def test_without_prompt_embeds_soft_forms_get_422_and_token_forms_are_served(engines, fake_vllm):
    engine = engines("llama", backend="vllm", vllm_url=fake_vllm(embeds=False).url)
    assert engine.backend.embeds is False
    for index, field in ((1, "soft_prompt"), (4, "embedding_offset")):
        with pytest.raises(Exception) as caught:
            engine.evaluate(request(engine, TEMPLATES["causal"], [index]), CallBudget(None))
        assert caught.value.status == 422 and caught.value.param == f"candidates.0.{field}"
        assert "--enable-prompt-embeds" in caught.value.message
    want = engine_logits(engines("llama").evaluate(request(engine, TEMPLATES["causal"], [0, 2]), CallBudget(None)))
    got = engine_logits(engine.evaluate(request(engine, TEMPLATES["causal"], [0, 2]), CallBudget(None)))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_a_vllm_returning_log_probabilities_is_refused_at_start_up(tiny_model_dirs, fake_vllm):
    settings = Settings(model=str(tiny_model_dirs["llama"]), device="cpu", require_api_key=False, backend="vllm",
                        vllm_url=fake_vllm(logprobs_mode="raw_logprobs").url)  # fmt: skip
    with pytest.raises(ModelError, match="--logprobs-mode raw_logits"):
        Engine(load_model(settings), settings)


def test_an_unreachable_or_unnamed_vllm_is_a_clear_start_up_error(tiny_model_dirs, fake_vllm):
    base = dict(model=str(tiny_model_dirs["llama"]), device="cpu", require_api_key=False, backend="vllm")
    loaded = load_model(Settings(**base))
    with pytest.raises(ModelError, match="did not answer GET /v1/models"):
        Engine(loaded, Settings(**base, vllm_url="http://127.0.0.1:9", vllm_startup_timeout_s=0.5))
    with pytest.raises(ModelError, match="serves \\['tiny'\\]"):
        Engine(loaded, Settings(**base, vllm_url=fake_vllm().url, vllm_model="other"))
    with pytest.raises(ModelError, match="needs vllm_url"):
        Engine(loaded, Settings(**base))


def test_vllm_going_away_is_a_503_and_refunded(engines, tiny_model_dirs):
    fake = LiveServer(fake_vllm_app(str(tiny_model_dirs["llama"]))).__enter__()
    engine = engines("llama", backend="vllm", vllm_url=fake.url, budget=5)
    fake.__exit__(None, None, None)
    body = {**inputs_body(engine, TEMPLATES["causal"]), "candidates": [candidates_json()[2]]}
    app = create_app(engine.settings, engine=engine)
    with LiveServer(app) as server, httpx.Client(base_url=server.url) as client:
        error = assert_error(client.post("/v1/evaluate", json=body), 503, "overloaded")
        assert "vLLM" in error["message"] and "nothing was charged" in error["message"]
        assert app.state.budget.used == 0


def test_the_cli_passes_the_backend_options_to_settings():
    from lmaas_server.cli import _settings

    settings = _settings(backend="vllm", vllm_url="http://vllm:8000", vllm_model="m")
    assert (settings.backend, settings.vllm_url, settings.vllm_model) == ("vllm", "http://vllm:8000", "m")
