"""Calibration at zero calls: the fitted bias/temperature is the optimum and undoes a label prior."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lmaas_client import calibration
from lmaas_protocol import scoring


def biased_logits(seed: int = 0, n: int = 64, classes: int = 3, prior: float = 3.0):
    """Separable logits, then every example pushed towards class 0 by `prior`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes)) + 2.0 * np.eye(classes)[labels]
    logits[:, 0] += prior
    return logits, labels


def objective(logits, labels, correction, ridge):
    z = correction.apply(logits)
    penalty = ridge * (np.sum(correction.bias**2) + (correction.scale - 1) ** 2)
    return scoring.loss("ce", z, labels) + penalty


def test_bias_undoes_a_label_prior():
    logits, labels = biased_logits()
    correction = calibration.fit(logits, labels)
    assert scoring.accuracy(logits, labels) < 0.6  # the prior wins most examples
    assert scoring.accuracy(correction.apply(logits), labels) > 0.8
    assert correction.bias[0] < -2.0 and correction.scale == 1.0  # pushes class 0 back down
    assert abs(correction.bias.sum()) < 1e-9  # softmax ignores a common shift: centred


@pytest.mark.parametrize("temperature", [False, True])
def test_fit_is_the_optimum_of_its_objective(temperature):
    logits, labels = biased_logits(seed=1, classes=4)
    ridge = 0.01
    best = calibration.fit(logits, labels, temperature=temperature, ridge=ridge)
    value = objective(logits, labels, best, ridge)
    rng = np.random.default_rng(2)
    for _ in range(20):  # any nearby correction is worse
        bias = best.bias + rng.normal(0, 0.05, best.bias.shape)
        scale = best.scale + (rng.normal(0, 0.05) if temperature else 0.0)
        assert objective(logits, labels, calibration.Calibration(bias, scale), ridge) > value - 1e-12


def test_temperature_cools_overconfident_logits():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, 200)
    noisy = rng.normal(0, 1, (200, 2)) + 0.8 * np.eye(2)[labels]  # weakly informative ...
    correction = calibration.fit(10 * noisy, labels, temperature=True)  # ... but stated 10x too sharply
    assert correction.scale < 0.3
    assert scoring.loss("ce", correction.apply(10 * noisy), labels) < scoring.loss("ce", 10 * noisy, labels) / 2


def test_calibrated_loss_is_never_above_the_plain_loss_and_round_trips():
    logits, labels = biased_logits(seed=4)
    assert calibration.calibrated_loss("ce", logits, labels) < scoring.loss("ce", logits, labels)
    assert calibration.calibrated_loss("perf", logits, labels) < scoring.loss("perf", logits, labels)
    correction = calibration.fit(logits, labels, temperature=True)
    again = calibration.Calibration.from_json(correction.to_json())
    np.testing.assert_allclose(again.apply(logits), correction.apply(logits))
    np.testing.assert_array_equal(calibration.Calibration.identity(3).apply(logits), logits)


# ------------------------------------------------------------------------------- through the API


def test_the_scorer_fits_a_calibration_per_candidate_and_applies_a_given_one(live_server):
    from lmaas_client import LMaaSClient
    from lmaas_client.evaluation import NO_PROMPT, TaskScorer
    from lmaas_client.tasks import get_task
    from lmaas_client.tasks.data import load_split
    from tests.client.test_runner_cli import DATA

    task = get_task("sst2")
    train = load_split(task, "train", 13, DATA)
    with live_server() as server, LMaaSClient(server.url) as client:
        scorer = TaskScorer(client, task, "suffix")
        (plain,) = scorer.score(train, [NO_PROMPT])
        (fitted,) = scorer.score(train, [NO_PROMPT], calibrate=True)
        skewed = calibration.Calibration(np.array([40.0, -40.0]))
        (forced,) = scorer.score(train, [NO_PROMPT], calibration=skewed)
    assert plain.calibration is None and fitted.calibration is not None
    np.testing.assert_array_equal(fitted.logits, plain.logits)  # the server's logits are kept as they came
    assert fitted.loss <= plain.loss  # the fit minimises cross-entropy (+ a ridge that only pulls towards 0)
    labels = np.array([e.label for e in train])
    assert forced.metric == pytest.approx(float((labels == 0).mean()))  # every example pushed to class 0


def biased_server(server, monkeypatch, bias: float = 6.0):
    """The served model's logits pushed towards class 0 by `bias`, as a small LM's label prior does."""
    engine = server.server.config.app.state.engine
    real = engine.score

    def biased(*args, **kwargs):
        logits = real(*args, **kwargs)
        logits[..., 0] += bias
        return logits

    monkeypatch.setattr(engine, "score", biased)


def calibrated_run(client, calibrate: bool, out_dir=None, method: str = "bbt"):
    from lmaas_client.run import RunConfig, run_tuning
    from lmaas_client.tasks import get_task
    from lmaas_client.tuners import make_tuner
    from tests.client.test_runner_cli import DATA, TINY

    options = {**TINY, "seed": 7, "calibrate": calibrate} if method == "bbt" else {"calibrate": calibrate}
    config = RunConfig(task="sst2", method=method, budget=6, seed=13, eval_every=3, test_size=32, data_dir=DATA,
                       placement="suffix", options=options)  # fmt: skip
    return run_tuning(client, get_task("sst2"), make_tuner(method, client.model_info(), **config.options), config,
                      out_dir)  # fmt: skip


def test_a_calibrated_run_searches_on_calibrated_losses_and_saves_its_calibration(live_server, monkeypatch, tmp_path):
    from lmaas_client import LMaaSClient
    from lmaas_client.prompt_io import load_prompt
    from tests.client.test_runner_cli import DATA, cli

    with live_server() as server, LMaaSClient(server.url) as client:
        biased_server(server, monkeypatch)
        plain = calibrated_run(client, calibrate=False)
        calibrated = calibrated_run(client, calibrate=True, out_dir=tmp_path / "run")
        evaluated = cli("eval", "--prompt", str(tmp_path / "run" / "prompt.npz"), "--server", server.url,
                        "--data-dir", DATA, "--test-size", "32")  # fmt: skip
    # the same seed asks the same first generation: its calibrated losses are lower (a bias undoes the prior)
    assert calibrated.curve[0]["best_train_loss"] < plain.curve[0]["best_train_loss"]
    # every run reports the calibrated manual prompt (the zero-tuning baseline), calibrating or not
    assert plain.manual_calibrated_test_acc == calibrated.manual_calibrated_test_acc is not None
    _, meta = load_prompt(tmp_path / "run" / "prompt.npz")
    assert meta["calibration"]["bias"][0] < -1  # the fitted bias takes the pushed class back down
    report = json.loads(evaluated.stdout)
    assert report["calibrated"] and report["score"] == calibrated.test_acc  # eval applies the saved calibration


def test_the_manual_method_reports_the_calibrated_manual_prompt_too(live_server, monkeypatch):
    from lmaas_client import LMaaSClient

    with live_server() as server, LMaaSClient(server.url) as client:
        biased_server(server, monkeypatch)
        manual = calibrated_run(client, calibrate=False, method="manual")
        manual_calibrated = calibrated_run(client, calibrate=True, method="manual")
    assert manual.test_acc == manual.manual_prompt_test_acc
    assert manual.manual_calibrated_test_acc is not None  # `--method manual` reports both
    assert manual_calibrated.test_acc == manual.manual_calibrated_test_acc  # calibrate=True hands that one over
    assert not manual.manual_kept and not manual_calibrated.manual_kept  # the method's own prompt: not a floor
