"""Calibration at zero calls: the fitted bias/temperature is the optimum and undoes a label prior."""

from __future__ import annotations

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
