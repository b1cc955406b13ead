"""Tune, predict, deploy, classify: a prompt tuned over real HTTP against an `lmaas-server serve` process (tiny
llama, SQLite file database), its predictions on a CSV, then the same labels from POST /v1/classify sent by a
plain HTTP client; other keys get 404, a restarted server still has the prompt, and bad requests get a clear
4xx and cost nothing."""

from __future__ import annotations

import base64
import csv

import httpx
import numpy as np

from tests.client.test_runner_cli import cli
from tests.conftest import REPO
from tests.server.metering.conftest import auth, fresh_database
from tests.support.tiny_models import HIDDEN

DATA = str(REPO / "data")
TEXTS = ["a moving, funny film", "dull from start to end", "the best acting of the year", "a waste of time",
         "I laughed and cried", "boring and far too long"]  # fmt: skip


def write_csv(path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "text_a"])
        writer.writerows([f"r{i}", text] for i, text in enumerate(TEXTS))


def labels_in(path) -> list[str]:
    with path.open(newline="") as handle:
        return [row["label"] for row in csv.DictReader(handle)]


def usage(client: httpx.Client) -> tuple[int, int, int]:
    report = client.get("/v1/usage").json()
    return report["used"], report["tokens_used"], len(report["recent"])


def test_tune_predict_deploy_classify_restart(request, tmp_path, server_processes, monkeypatch):
    monkeypatch.setenv("LMAAS_NO_PROGRESS", "1")
    with fresh_database("sqlite", tmp_path / "db", request) as database:
        meter = database.meter()
        secret, _ = meter.create_key(1000, name="owner")
        stranger, _ = meter.create_key(1000, name="stranger")
        server = server_processes(database.url, "flow", LMAAS_MAX_CLASSIFY_TEXTS="8")
        server.start().wait_healthy()
        keyed = ["--server", server.url, "--api-key", secret]
        tuned = cli("tune", *keyed, "--task", "sst2", "--budget", "6", "--seed", "13", "--popsize", "3",
                    "--prompt-length", "2", "--intrinsic-dim", "8", "--test-size", "16", "--eval-every", "3",
                    "--data-dir", DATA, "--placement", "suffix", "--out", str(tmp_path / "run"),
                    "-o", "calibrate=true")  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        prompt = tmp_path / "run" / "prompt.npz"
        write_csv(tmp_path / "reviews.csv")
        predicted = cli("predict", *keyed, "--prompt", str(prompt), "--input", str(tmp_path / "reviews.csv"),
                        "--out", str(tmp_path / "predicted.csv"))  # fmt: skip
        assert predicted.exit_code == 0, predicted.output
        deployed = cli("deploy", str(prompt), *keyed)
        assert deployed.exit_code == 0, deployed.output
        prompt_id = deployed.stdout.strip().splitlines()[-1]  # the id alone on the last line

        body = {"prompt": prompt_id, "texts": [{"text_a": text} for text in TEXTS]}
        with httpx.Client(base_url=server.url, headers=auth(secret), timeout=120) as client:
            classified = client.post("/v1/classify", json=body)
            assert classified.status_code == 200, classified.text
            results = classified.json()["results"]
            assert [r["label"] for r in results] == labels_in(tmp_path / "predicted.csv")
            assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-6 for r in results)
            assert client.get(f"/v1/prompts/{prompt_id}").json()["calibrated"] is True

            before = usage(client)
            misfit = {"candidate": {"soft_prompt": {"dtype": "float32", "shape": [1, HIDDEN + 1],
                                                    "data": _base64_zeros(HIDDEN + 1)}},
                      "template": "{text_a}{prompt} It was{mask}", "verbalizer": [[5], [6]],
                      "labels": ["negative", "positive"]}  # fmt: skip
            bad = [
                (client.post("/v1/classify", json={**body, "prompt": "pr_" + "f" * 32}), 404, "prompt"),
                (client.post("/v1/prompts", json=misfit), 422, "candidate.soft_prompt.shape"),
                (client.post("/v1/classify", json={**body, "texts": [{"text_a": ""}]}), 422, "texts.0.text_a"),
                (client.post("/v1/classify", json={**body, "texts": body["texts"] * 2}), 422, "texts"),  # 12 > 8
            ]
            for response, status, param in bad:
                assert response.status_code == status, response.text
                error = response.json()["error"]
                assert error["param"] == param and error["message"], error
            assert usage(client) == before  # none of them charged, none left a ledger row
        with httpx.Client(base_url=server.url, headers=auth(stranger), timeout=120) as other:
            assert other.get(f"/v1/prompts/{prompt_id}").status_code == 404
            assert other.post("/v1/classify", json=body).status_code == 404
            assert other.delete(f"/v1/prompts/{prompt_id}").status_code == 404
            assert other.get("/v1/usage").json()["used"] == 0

        server.stop()
        restarted = server_processes(database.url, "flow-restarted").start().wait_healthy()
        with httpx.Client(base_url=restarted.url, headers=auth(secret), timeout=120) as client:
            assert [p["id"] for p in client.get("/v1/prompts").json()["prompts"]] == [prompt_id]
            again = client.post("/v1/classify", json=body).json()["results"]
        assert [r["label"] for r in again] == [r["label"] for r in results]
        from_cli = cli("predict", "--deployed", prompt_id, "--server", restarted.url, "--api-key", secret,
                       "--input", str(tmp_path / "reviews.csv"), "--out", str(tmp_path / "deployed.csv"))  # fmt: skip
        assert from_cli.exit_code == 0, from_cli.output
        assert labels_in(tmp_path / "deployed.csv") == labels_in(tmp_path / "predicted.csv")


def _base64_zeros(count: int) -> str:
    return base64.b64encode(np.zeros(count, dtype="<f4").tobytes()).decode()
