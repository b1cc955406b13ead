"""Tuning runs end to end over real HTTP (`run_tuning`) and the `lmaas` CLI, on tiny models, tiny budgets."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from typer.testing import CliRunner

import lmaas_client.client as client_module
from lmaas_client import LMaaSClient
from lmaas_client.cli import app
from lmaas_client.evaluation import NO_PROMPT, TaskScorer
from lmaas_client.prompt_io import load_prompt
from lmaas_client.run import Progress, RunConfig, run_tuning
from lmaas_client.tasks import get_task
from lmaas_client.tasks.data import load_split
from lmaas_client.tuners import make_tuner
from lmaas_protocol import EvaluateRequest, Example
from tests.conftest import REPO, free_port
from tests.support.tiny_models import build_tokenizer

DATA = str(REPO / "data")
TINY = {"popsize": 3, "prompt_length": 2, "intrinsic_dim": 8}
RESULT_FIELDS = {"method", "task", "seed", "budget", "calls_used", "eval_calls", "manual_prompt_test_acc", "best_dev_acc",
                 "test_acc", "test_size", "seconds", "curve", "model", "family", "template", "metric", "config",
                 "manual_calibrated_test_acc"}  # fmt: skip


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.001)
    monkeypatch.setattr(client_module, "MAX_RETRY_DELAY", 0.01)
    monkeypatch.setenv("LMAAS_NO_PROGRESS", "1")
    monkeypatch.setenv("LMAAS_RETRY_WINDOW_S", "1")  # an unreachable server fails in a second, not two minutes
    for name in ("LMAAS_SERVER", "LMAAS_API_KEY", "LMAAS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def tune(client: LMaaSClient, budget: int, seed: int = 42, out_dir=None, **options):
    config = RunConfig(task="sst2", method="bbt", budget=budget, seed=seed, eval_every=3, test_size=16, data_dir=DATA,
                       options={**TINY, "seed": seed, **options})  # fmt: skip
    tuner = make_tuner("bbt", client.model_info(), **config.options)
    seen: list[Progress] = []
    result = run_tuning(client, get_task("sst2"), tuner, config, out_dir, on_progress=seen.append)
    return result, seen


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_run_tuning_end_to_end(live_server, kind, tmp_path):
    with live_server(kind, budget=1000) as server, LMaaSClient(server.url) as client:
        result, progress = tune(client, budget=6, out_dir=tmp_path)
        budget = server.server.config.app.state.budget
    data = result.to_json()
    assert set(data) >= RESULT_FIELDS
    json.dumps(data)  # JSON-serialisable as is
    assert (result.method, result.task, result.seed, result.budget) == ("bbt", "sst2", 42, 6)
    assert result.calls_used == 6
    assert result.family == ("causal" if kind == "llama" else "masked")
    assert result.test_size == 16 and result.metric == "accuracy"
    for test_score in (result.manual_prompt_test_acc, result.test_acc):  # k/16 on the 16 test examples
        assert 0.0 <= test_score <= 1.0 and test_score * 16 == round(test_score * 16)
    assert 0.0 <= result.best_dev_acc <= 1.0 and result.best_dev_acc * 32 == round(result.best_dev_acc * 32)
    assert math.isfinite(result.best_train_loss) and result.best_train_loss > 0
    assert result.seconds >= 0
    assert [point["calls"] for point in result.curve] == [3, 6]
    losses = [point["best_train_loss"] for point in result.curve]
    assert losses == sorted(losses, reverse=True)  # best-so-far never gets worse
    assert all(point["dev_score"] is not None for point in result.curve)
    assert [p.calls_used for p in progress if p.message is None] == [3, 6]
    assert progress[-1].eval_calls == result.eval_calls - 1  # all but the final test scoring (one call)
    # the server charged every call: train calls + manual-prompt test + dev evaluations + final test
    assert budget.used == result.calls_used + result.eval_calls
    assert result.eval_calls >= 3  # manual test, at least one dev evaluation, final test
    assert result.config["popsize"] == 3
    assert result.config["placement"] == ("suffix" if kind == "llama" else "prefix")  # auto: by the served family

    candidate, meta = load_prompt(tmp_path / "prompt.npz")
    assert candidate.soft.shape == (2, 32) and candidate.token_ids is not None and len(candidate.token_ids) == 2
    assert meta["task"] == "sst2" and meta["seed"] == 42 and meta["family"] == result.family
    assert meta["template"] == result.template


def test_budget_not_divisible_by_popsize_stops_exactly(live_server):
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        result, progress = tune(client, budget=7, seed=13)
        used = server.server.config.app.state.budget.used
    assert result.calls_used == 7
    assert [point["calls"] for point in result.curve] == [3, 6, 7]
    assert progress[-1].calls_used == 7
    assert used == 7 + result.eval_calls


def test_server_budget_counter_matches_usage(live_server):
    with live_server("llama", budget=200) as server, LMaaSClient(server.url) as client:
        result, _ = tune(client, budget=4, seed=21, popsize=3)
        scorer = TaskScorer(client, get_task("sst2"))
        probe = client.evaluate(EvaluateRequest(template=scorer.template, examples=[Example(text_a="fun")],
                                                verbalizer=scorer.verbalizer, candidates=[NO_PROMPT.to_wire()]))  # fmt: skip
    assert probe.usage.budget_remaining == 200 - (result.calls_used + result.eval_calls) - 1


def test_scorer_splits_work_to_the_servers_limits(live_server):
    train = load_split(get_task("sst2"), "train", 42, REPO / "data")
    with live_server("llama") as server, LMaaSClient(server.url) as client:
        candidates = make_tuner("bbt", client.model_info(), **TINY).ask()
        whole = TaskScorer(client, get_task("sst2"))
        expected = whole.logits(train, candidates)
    with live_server("llama", max_candidates=2, max_examples=10) as server, LMaaSClient(server.url) as client:
        chunked = TaskScorer(client, get_task("sst2"))
        observed = chunked.logits(train, candidates)
        used = server.server.config.app.state.budget.used
    assert whole.calls == 3
    assert chunked.calls == used == 3 * 4  # 4 example chunks x 3 candidates, each charged
    for a, b in zip(expected, observed, strict=True):
        assert a.shape == (32, 2)
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_long_examples_on_roberta_are_truncated_to_fit(live_server):
    with live_server("roberta") as server, LMaaSClient(server.url, max_retries=0) as client:
        scorer = TaskScorer(client, get_task("sst2"))
        long_text = " ".join(["the movie was great and fun to watch"] * 40)
        logits = scorer.logits([Example(text_a=long_text, label=1)], [NO_PROMPT])
    assert logits[0].shape == (1, 2)


# ----------------------------------------------------------------------------------------- CLI


def cli(*args: str):
    return CliRunner().invoke(app, list(args))


def assert_clean_failure(result, *needles: str) -> str:
    output = result.output  # stdout and stderr, as a terminal shows them
    assert result.exit_code != 0, output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}: {output}"
    assert "Traceback" not in output
    for needle in needles:
        assert needle in output, output
    return output


@pytest.mark.parametrize(("kind", "placement"), [("llama", "prefix"), ("bert", "suffix")])
def test_cli_tune_then_eval(live_server, tmp_path, kind, placement):
    out = tmp_path / "run"
    with live_server(kind) as server:
        tuned = cli("tune", "--out", str(out), "--server", server.url, "--budget", "6", "--popsize", "3",
                    "--prompt-length", "2", "--intrinsic-dim", "8", "--test-size", "16", "--eval-every", "3",
                    "--seed", "13", "--data-dir", DATA, "--placement", placement, "-o", "loss=hinge",
                    "-o", "sigma=0.5")  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        result = json.loads((out / "result.json").read_text())
        assert (out / "prompt.npz").is_file()
        evaluated = cli("eval", "--prompt", str(out / "prompt.npz"), "--split", "dev", "--server", server.url,
                        "--data-dir", DATA)  # fmt: skip
        assert evaluated.exit_code == 0, evaluated.output
        on_test = cli("eval", "--prompt", str(out / "prompt.npz"), "--server", server.url, "--data-dir", DATA,
                      "--test-size", "16")  # fmt: skip
        assert on_test.exit_code == 0, on_test.output
    assert result["calls_used"] == 6 and result["budget"] == 6 and result["seed"] == 13
    assert result["config"]["loss"] == "hinge" and result["config"]["sigma"] == 0.5
    assert result["config"]["placement"] == placement
    assert load_prompt(out / "prompt.npz")[1]["placement"] == placement
    assert "calls used 6/6" in tuned.stderr
    report = json.loads(evaluated.stdout)
    assert report["task"] == "sst2" and report["split"] == "dev" and report["seed"] == 13
    assert report["examples"] == 32 and report["calls"] == 1
    assert report["score"] == result["best_dev_acc"]
    test_report = json.loads(on_test.stdout)
    assert test_report["examples"] == 16 and test_report["score"] == result["test_acc"]


def test_cli_info(live_server):
    with live_server("bert") as server:
        shown = cli("info", "--server", server.url)
        from_env = CliRunner().invoke(app, ["info"], env={"LMAAS_SERVER": server.url})
    assert shown.exit_code == 0 and from_env.exit_code == 0, from_env.output
    info = json.loads(shown.stdout)
    assert (
        info["family"] == "masked" and info["hidden_size"] == 32 and info["vocab_size"] == len(build_tokenizer("bert"))
    )
    assert json.loads(from_env.stdout) == info


def test_cli_unknown_method(live_server, tmp_path):
    with live_server("llama") as server:
        result = cli("tune", "--out", str(tmp_path / "x"), "--server", server.url, "--method", "nope", "--budget", "2")
    assert_clean_failure(result, "unknown method 'nope'", "bbt")
    assert result.exit_code == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    ("option", "needle"),
    [
        ("popsize", "KEY=VALUE"),
        ("=3", "KEY=VALUE"),
        ("popsise=3", "popsise"),
        ("popsize=one", "popsize"),
        ("loss=mse", "loss"),
    ],
)
def test_cli_bad_options(live_server, tmp_path, option, needle):
    with live_server("llama") as server:
        result = cli("tune", "--out", str(tmp_path / "x"), "--server", server.url, "--budget", "2", "-o", option)
    assert_clean_failure(result, needle)


def test_cli_unknown_task_and_bad_arguments(live_server, tmp_path):
    with live_server("llama") as server:
        unknown = cli("tune", "--out", str(tmp_path / "x"), "--server", server.url, "--task", "sst3", "--budget", "2")
        bad_seed = cli("tune", "--out", str(tmp_path / "y"), "--server", server.url, "--seed", "7", "--budget", "2",
                       "--data-dir", DATA)  # fmt: skip
        placement = cli("tune", "--out", str(tmp_path / "z"), "--server", server.url, "--placement", "middle")
        split = cli("eval", "--prompt", str(tmp_path / "none.npz"), "--server", server.url, "--split", "validation")
        missing = cli("eval", "--prompt", str(tmp_path / "none.npz"), "--server", server.url)
    assert_clean_failure(unknown, "unknown task 'sst3'", "sst2")
    assert_clean_failure(bad_seed, "seed 7", "13")
    assert_clean_failure(placement, "prefix or suffix")
    assert_clean_failure(split, "train, dev or test")
    assert_clean_failure(missing, "none.npz")
    assert_clean_failure(cli("tune", "--out", str(tmp_path / "w"), "--budget", "0"), "budget")


def test_cli_server_down(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    result = cli("tune", "--out", str(tmp_path / "x"), "--server", url, "--budget", "2")
    output = assert_clean_failure(result, "cannot reach", url)
    assert result.exit_code == 1 and "error" in output
    assert_clean_failure(cli("info", "--server", url), "cannot reach")


def test_cli_budget_exhausted_exit_code(live_server, tmp_path):
    with live_server("llama", budget=2) as server:
        result = cli("tune", "--out", str(tmp_path / "x"), "--server", server.url, "--budget", "6", "--popsize", "3",
                     "--prompt-length", "2", "--intrinsic-dim", "8", "--test-size", "16", "--data-dir", DATA)  # fmt: skip
    assert_clean_failure(result, "budget exhausted")
    assert result.exit_code == 3


def test_test_at_records_a_learning_curve_on_test(live_server):
    """--test-at: the selected prompt is scored on test where the curve reaches each call count; charged as eval."""
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        config = RunConfig(task="sst2", method="bbt", budget=9, seed=42, eval_every=100, test_size=16, data_dir=DATA,
                           options={**TINY, "seed": 42}, test_at=[2, 6, 9])  # fmt: skip
        tuner = make_tuner("bbt", client.model_info(), **config.options)
        result = run_tuning(client, get_task("sst2"), tuner, config)
        used = server.server.config.app.state.budget.used
    tested = [(p["calls"], p.get("test_score")) for p in result.curve]
    assert [calls for calls, _ in tested] == [3, 6, 9]
    assert all(score is not None and score * 16 == round(score * 16) for _, score in tested)  # 2 -> first gen (3)
    assert all(p["dev_score"] is not None for p in result.curve)  # each test point ends like a run of that budget
    assert result.test_acc == tested[-1][1]  # the last point is the final test: not scored twice
    # manual test + its calibration on train + the manual prompt on dev (the manual floor, on by default)
    # + 3 dev evaluations + 3 test scorings (one call each); nothing more
    assert not result.manual_kept and result.eval_calls == 9 and used == result.calls_used + result.eval_calls


def test_cli_resume_refuses_a_checkpoint_that_would_run_code(live_server, tmp_path):
    """A run folder copied from someone else: `--resume` must not execute what its checkpoint names."""
    import pickle

    from tests.client.test_checkpoints import Payload

    out, marker = tmp_path / "run", tmp_path / "pwned"
    with live_server() as server:
        args = ["tune", "--out", str(out), "--server", server.url, "--budget", "3", "--popsize", "3",
                "--prompt-length", "2", "--intrinsic-dim", "8", "--test-size", "8", "--data-dir", DATA]  # fmt: skip
        assert cli(*args).exit_code == 0
        (out / "result.json").unlink()  # as a run that crashed before its end
        (out / "checkpoint.pkl").write_bytes(pickle.dumps({"version": 1, "tuner": Payload(marker)}))
        resumed = cli("tune", "--out", str(out), "--resume")
    assert_clean_failure(resumed, "refusing to load")
    assert not marker.exists()


def test_resuming_a_completed_run_does_nothing_and_costs_nothing(live_server, tmp_path):
    out = tmp_path / "run"
    with live_server() as server:
        args = ["tune", "--out", str(out), "--server", server.url, "--budget", "3", "--popsize", "3",
                "--prompt-length", "2", "--intrinsic-dim", "8", "--test-size", "8", "--data-dir", DATA]  # fmt: skip
        assert cli(*args).exit_code == 0
        budget = server.server.config.app.state.budget
        used, before = budget.used, (out / "result.json").read_text()
        resumed = cli("tune", "--out", str(out), "--resume")
        assert resumed.exit_code == 0, resumed.output
        assert budget.used == used and (out / "result.json").read_text() == before


def test_cli_test_at_must_be_call_counts(tmp_path):
    result = CliRunner().invoke(app, ["tune", "--out", str(tmp_path / "run"), "--test-at", "100,x"])
    assert result.exit_code != 0 and "--test-at" in result.output


def test_cli_tune_a_task_given_by_flags_saves_it_in_the_run_folder_and_resumes(live_server, tmp_path):
    sample = REPO / "tests" / "client" / "data" / "yelp_sample.csv"
    out = tmp_path / "run"
    flags = ("--train", str(sample), "--dev", str(sample), "--test", str(sample), "--label-column", "label",
             "--text-a", "text", "--label-name", "negative", "--label-name", "positive", "--label-word", " bad",
             "--label-word", " great", "--template", "{prompt}Review: {text_a}\\nSentiment:{mask}")  # fmt: skip
    with live_server("llama") as server:
        tuned = cli("tune", "--out", str(out), "--server", server.url, "--task", "yelp-flags", "--budget", "3",
                    "--popsize", "3", "--prompt-length", "2", "--intrinsic-dim", "8", "--eval-every", "3",
                    *flags)  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        settings = json.loads((out / "run.json").read_text())
        assert settings["task"] == str((out / "task.json").resolve())
        assert json.loads((out / "task.json").read_text())["name"] == "yelp-flags"
        resumed = cli("tune", "--out", str(out), "--resume", "--server", server.url)
        assert resumed.exit_code == 0, resumed.output
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "yelp-flags" and result["calls_used"] == 3
