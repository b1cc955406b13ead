"""The `Run` object: it owns the run folder (every file), its settings, state and checkpoint; resume continues it."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest

import lmaas_client.client as client_module
from lmaas_client import LMaaSClient
from lmaas_client.prompt_io import load_prompt
from lmaas_client.run import CHECKPOINT, Run, RunConfig
from tests.conftest import REPO
from tests.support.crash import Crash, crash_after

DATA = str(REPO / "data")
TINY = {"popsize": 3, "prompt_length": 2, "intrinsic_dim": 8}
FILES = {"run.json", "result.json", CHECKPOINT, "prompt.npz", "curve.png"}


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setattr(client_module, "INITIAL_RETRY_DELAY", 0.001)
    for name in ("LMAAS_SERVER", "LMAAS_API_KEY", "LMAAS_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)


def config(budget: int = 6) -> RunConfig:
    return RunConfig(task="sst2", method="bbt", budget=budget, seed=42, eval_every=3, test_size=16, data_dir=DATA,
                     options={**TINY, "seed": 42})  # fmt: skip


def test_create_tune_writes_every_file_and_exposes_result_and_prompt(live_server, tmp_path):
    folder = tmp_path / "run"
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        run = Run.create(folder, config(), client)
        assert json.loads((folder / "run.json").read_text())["server"] == server.url  # written before tuning
        assert run.result is None and run.best_prompt is None
        result = run.tune()
    assert {p.name for p in folder.iterdir()} >= FILES
    assert run.result is result and result.status == "completed" and result.calls_used == 6
    assert json.loads((folder / "result.json").read_text()) == json.loads(json.dumps(result.to_json()))
    saved, meta = load_prompt(folder / "prompt.npz")
    assert meta["method"] == "bbt" and meta["seed"] == 42
    np.testing.assert_array_equal(saved.soft, run.best_prompt.soft)  # self-contained: A z computed here
    # run.json keeps the placement "auto" resolved to (suffix: the tiny llama is a causal LM)
    assert Run.read_settings(folder) == (replace(config(), placement="suffix"), server.url)


def test_resume_continues_as_an_uninterrupted_run(live_server, tmp_path):
    with live_server("llama", budget=1000) as server:
        with Run.create(tmp_path / "whole", config(9), server=server.url) as run:  # the run opens its own client
            whole = run.tune()
        with Run.create(tmp_path / "cut", config(9), server=server.url) as run, pytest.raises(Crash):
            run.tune(on_progress=crash_after(3))
        with Run.resume(tmp_path / "cut") as run:
            resumed = run.tune()
    assert resumed.calls_used == whole.calls_used == 9
    assert resumed.best_train_loss == whole.best_train_loss and resumed.test_acc == whole.test_acc
    assert [p["calls"] for p in resumed.curve] == [p["calls"] for p in whole.curve]


def test_resume_without_a_run_folder_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a run folder"):
        Run.resume(tmp_path)


def test_the_select_option_reaches_the_run_train_selection_spends_no_dev_calls(live_server, tmp_path):
    results = {}
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        for mode in ("dev", "train"):
            base = config(9)
            # without the manual floor, whose dev call (and kept manual prompt) would blur the count below
            options = {**base.options, "select": mode, "manual_floor": False}
            chosen = RunConfig(**{**base.__dict__, "options": options})
            results[mode] = Run.create(tmp_path / mode, chosen, client).tune()
    # the same search either way; "dev" pays 3 dev evaluations on top of the manual and final test scorings
    assert results["dev"].best_train_loss == results["train"].best_train_loss
    assert results["dev"].eval_calls - results["train"].eval_calls == 3
    assert results["train"].best_dev_acc is None


@pytest.mark.parametrize("calibrate", [False, True])
def test_the_manual_floor_adds_one_dev_call_and_hands_over_the_manual_prompt_unless_beaten(
    live_server, tmp_path, calibrate
):
    results, prompts = {}, {}
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        for floor in (False, True):
            base = config(9)
            options = {**base.options, "manual_floor": floor, "calibrate": calibrate}
            run = Run.create(tmp_path / str(floor), RunConfig(**{**base.__dict__, "options": options}), client)
            results[floor], prompts[floor] = run.tune(), run.best_prompt
    plain, floored = results[False], results[True]
    assert floored.best_train_loss == plain.best_train_loss  # the same search
    assert floored.best_dev_acc >= plain.best_dev_acc
    manual = plain.manual_calibrated_test_acc if calibrate else plain.manual_prompt_test_acc
    assert floored.manual_kept is prompts[True].empty and plain.manual_kept is False  # result.json says which
    if prompts[True].empty:  # kept: the manual prompt's own test score (calibrated as the run is), already known
        assert floored.test_acc == pytest.approx(manual)
        assert floored.eval_calls == plain.eval_calls  # + the manual prompt on dev, - the final test scoring
    else:  # beaten on dev: the same prompt as without the floor
        assert floored.best_dev_acc == plain.best_dev_acc and floored.test_acc == plain.test_acc
        assert floored.eval_calls == plain.eval_calls + 1  # the manual prompt on dev


def test_score_mean_spends_one_more_call_per_generation(live_server, tmp_path):
    curves = {}
    with live_server("llama", budget=1000) as server, LMaaSClient(server.url) as client:
        for score_mean in (False, True):
            base = config(8)
            chosen = RunConfig(**{**base.__dict__, "options": {**base.options, "score_mean": score_mean}})
            curves[score_mean] = [
                p["calls"] for p in Run.create(tmp_path / str(score_mean), chosen, client).tune().curve
            ]
    assert curves == {False: [3, 6, 8], True: [4, 8]}  # popsize 3, + the mean: 4 calls per generation
