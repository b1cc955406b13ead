"""Every method and baseline runs end to end through the `lmaas tune` CLI on every shipped task (tiny budgets,
a tiny random causal LM served over real HTTP; the white-box methods load the same tiny model locally)."""

from __future__ import annotations

import json

import pytest

from lmaas_client.tasks import TASKS
from lmaas_client.tuners import TUNERS
from tests.client.test_runner_cli import DATA, cli

pytest.importorskip("torch")  # prompt-tuning and gdfo need the client's optional `local` extra

SHIPPED = ["sst2", "mrpc", "rte", "snli", "agnews", "dbpedia"]
CMA = ["-o", "popsize=3", "-o", "prompt_length=2", "-o", "intrinsic_dim=8"]


def opts(**options) -> list[str]:
    return [arg for key, value in options.items() for arg in ("-o", f"{key}={value}")]


def method_options(method: str, model_dir: str) -> list[str]:
    """Each method at its smallest sensible size: options as a user passes them (-o KEY=VALUE)."""
    return {
        "bbt": CMA,
        "bbtv2": CMA,
        "dept": opts(popsize=3, prompt_length=2, prompt_dim=6, offset_a_dim=3, offset_b_dim=3, offset_length=16),
        "bdpl": ["-o", "prompt_length=2", "-o", "num_candidates=8", "-o", "num_samples=3"],
        "gdfo": [*CMA, "-o", "student_rank=2", "-o", "distill_batch=8", "-o", f"student={model_dir}"],
        "prompt-tuning": ["-o", "prompt_length=2", "-o", "epochs=1", "-o", f"local_model={model_dir}"],
        "manual": [],
        "icl": ["-o", "max_demo_tokens=8"],
    }[method]


def test_the_matrix_covers_every_registered_method_and_shipped_task():
    assert set(TUNERS) == {"bbt", "bbtv2", "dept", "bdpl", "gdfo", "prompt-tuning", "manual", "icl"}
    assert set(SHIPPED) <= set(TASKS)


@pytest.mark.parametrize("task", SHIPPED)
def test_every_method_tunes_every_shipped_task_through_the_cli(live_server, tiny_model_dirs, tmp_path, monkeypatch,
                                                               task):  # fmt: skip
    monkeypatch.setenv("LMAAS_NO_PROGRESS", "1")
    monkeypatch.delenv("LMAAS_API_KEY", raising=False)
    model_dir = str(tiny_model_dirs["llama-long"])
    with live_server("llama-long", budget=100_000) as server:
        for method in sorted(TUNERS):
            out = tmp_path / method
            placement = "prefix" if method == "icl" else "suffix"  # demonstrations go before the text
            ran = cli("tune", "--server", server.url, "--task", task, "--method", method, "--budget", "6",
                      "--seed", "13", "--test-size", "16", "--eval-every", "3", "--data-dir", DATA,
                      "--placement", placement, "--out", str(out), *method_options(method, model_dir))  # fmt: skip
            assert ran.exit_code == 0, f"{method} on {task}: {ran.output}"
            result = json.loads((out / "result.json").read_text())
            assert (result["method"], result["task"]) == (method, task)
            assert result["metric"] == ("f1" if task == "mrpc" else "accuracy")
            assert 0.0 <= result["test_acc"] <= 1.0
            black_box = TUNERS[method].black_box and method not in ("manual", "icl")
            assert result["calls_used"] == (6 if black_box else 0), (method, result["calls_used"])
            assert (out / "prompt.npz").is_file() or method == "manual"
