"""Losses and metrics on label-word logits [examples, classes]: the one place both sides compute them (numpy only).

Decision (issue 15, item 5): the server keeps sending each candidate's mean cross-entropy and accuracy (the
wire format stays as it is; `curl` users and simple clients read them), and both numbers come from this
module, as do every loss and metric the client computes. The client still computes its own from the
returned logits, because it needs what the server does not send: the run's loss (ce, hinge or -metric),
F1, calibrated losses (`lmaas_client.calibration`), and scores over a training set that a request limit
splits into several calls. One implementation means the two can never disagree on the same logits.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

LossName = Literal["ce", "hinge", "perf"]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(axis=-1) == labels).mean())


def f1_binary(logits: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    predicted = logits.argmax(axis=-1) == positive
    actual = labels == positive
    tp = float((predicted & actual).sum())
    denominator = float(predicted.sum() + actual.sum())
    return 2 * tp / denominator if denominator else 0.0


def score(metric: str, logits: np.ndarray, labels: np.ndarray) -> float:
    return f1_binary(logits, labels) if metric == "f1" else accuracy(logits, labels)


def loss(name: LossName, logits: np.ndarray, labels: np.ndarray, metric: str = "accuracy") -> float:
    """ce: mean cross-entropy; hinge: sum over wrong classes of max(0, l_j - l_y + 2), / N; perf: -metric."""
    if name == "ce":
        return float(-log_softmax(logits)[np.arange(len(labels)), labels].mean())
    if name == "hinge":
        gold = logits[np.arange(len(labels)), labels][:, None]
        margins = np.maximum(0.0, logits - gold + 2.0)
        margins[np.arange(len(labels)), labels] = 0.0
        return float(margins.sum() / len(labels))
    if name == "perf":
        return -score(metric, logits, labels)
    raise ValueError(f"unknown loss {name!r}")
