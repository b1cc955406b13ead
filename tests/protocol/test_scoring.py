"""Losses and metrics on label-word logits (lmaas_protocol.scoring), by hand (the server's loss and accuracy come from here too)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmaas_protocol import scoring

LOGITS = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 3.0]])
LABELS = np.array([0, 0, 1])


def test_accuracy_and_f1_by_hand():
    assert scoring.accuracy(LOGITS, LABELS) == pytest.approx(2 / 3)
    # predicted [0, 1, 1], actual [0, 0, 1]: tp = 1, 2 predicted positive, 1 actual positive
    assert scoring.f1_binary(LOGITS, LABELS) == pytest.approx(2 * 1 / (2 + 1))
    assert scoring.f1_binary(np.array([[1.0, 0.0]]), np.array([0])) == 0.0  # no positives at all
    assert scoring.score("f1", LOGITS, LABELS) == pytest.approx(2 / 3)
    assert scoring.score("accuracy", LOGITS, np.array([0, 1, 1])) == 1.0


def test_cross_entropy_by_hand():
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.e) + math.log(1 + math.exp(-2))) / 3
    assert scoring.loss("ce", LOGITS, LABELS) == pytest.approx(expected, rel=1e-9)
    assert scoring.loss("ce", np.array([[1000.0, 0.0]]), np.array([1])) == pytest.approx(1000.0)  # stable
    assert scoring.loss("ce", np.array([[0.0, 0.0, 0.0]]), np.array([2])) == pytest.approx(math.log(3))


def test_hinge_by_hand():
    # sum over j != y of max(0, l_j - l_y + 2), divided by N: rows give 0, 3 and 0
    assert scoring.loss("hinge", LOGITS, LABELS) == pytest.approx(3 / 3)
    three = np.array([[1.0, 2.0, 0.5], [0.0, 0.0, 5.0]])  # row 0: 3 + 1.5; row 1: 0 + 0
    assert scoring.loss("hinge", three, np.array([0, 2])) == pytest.approx(4.5 / 2)
    assert scoring.loss("hinge", np.array([[0.0, 0.0]]), np.array([1])) == pytest.approx(2.0)  # a tie costs the margin


def test_perf_loss_is_minus_the_metric_and_unknown_losses_raise():
    assert scoring.loss("perf", LOGITS, LABELS) == pytest.approx(-2 / 3)
    assert scoring.loss("perf", LOGITS, np.array([1, 0, 1]), metric="f1") == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="unknown loss"):
        scoring.loss("mse", LOGITS, LABELS)  # type: ignore[arg-type]
