"""Calibration at zero calls: a per-class bias (and optionally a temperature) on label-word logits.

Every evaluation already returns each example's label-word logits [N, C], so the client can fit, on the
training set it pays for anyway, the affine correction z = s * logits + b (s = 1 / temperature, b [C]) that
minimises the cross-entropy. A small LM's label prior (e.g. " positive" far likelier than " negative" after
any review) then stops costing accuracy, and a tuner whose objective is the *calibrated* loss (the loss after
the best correction for that candidate) searches for prompts that separate the classes instead of prompts
that only shift the prior, which the bias does for free.

The fit is convex: cross-entropy is convex in z and z is affine in theta = (s, b), so a few Newton steps on
theta (C + 1 values; a ridge towards s = 1, b = 0 keeps 16 examples per class from over-fitting) find the
optimum. Supervised bias fitting on labelled logits is the variant of "Calibrate Before Use" (Zhao et al.,
2021) that measured better here than its content-free input.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from lmaas_protocol import scoring

NEWTON_STEPS = 25
TOLERANCE = 1e-10  # stop when a Newton step changes theta by less than this (max abs)
DEFAULT_RIDGE = 0.01  # per-value penalty, in units of mean cross-entropy


@dataclass(frozen=True)
class Calibration:
    """z = logits * scale + bias; `scale` is 1 / temperature (1.0 when only the bias is fitted)."""

    bias: np.ndarray  # [C]
    scale: float = 1.0

    def apply(self, logits: np.ndarray) -> np.ndarray:
        """[..., C] -> [..., C] calibrated logits (argmax and softmax of these are the calibrated decision)."""
        return np.asarray(logits, dtype=np.float64) * self.scale + self.bias

    def to_json(self) -> dict[str, Any]:
        return {"bias": [float(v) for v in self.bias], "scale": float(self.scale)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Calibration:
        return cls(np.asarray(data["bias"], dtype=np.float64), float(data.get("scale", 1.0)))

    @classmethod
    def identity(cls, classes: int) -> Calibration:
        return cls(np.zeros(classes))


def fit(logits: np.ndarray, labels: np.ndarray, temperature: bool = False, ridge: float = DEFAULT_RIDGE) -> Calibration:
    """The correction that minimises mean CE(logits * s + b, labels) + ridge * (|b|^2 + (s - 1)^2).

    logits [N, C], labels [N] in 0..C-1. With `temperature` False, s stays 1 and only b is fitted.
    """
    logits = np.asarray(logits, dtype=np.float64)
    labels = np.asarray(labels)
    n, classes = logits.shape
    onehot = np.eye(classes)[labels]  # [N, C]
    # d z_i / d theta: [N, C, 1 + C], the column for s is the logits, the rest the identity (for b)
    jacobian = np.concatenate([logits[:, :, None], np.broadcast_to(np.eye(classes), (n, classes, classes))], axis=2)
    if not temperature:
        jacobian = jacobian[:, :, 1:]
    theta = np.concatenate([[1.0] if temperature else [], np.zeros(classes)])
    anchor = theta.copy()  # the ridge pulls towards no correction
    offset = 0.0 if temperature else logits  # without a temperature the logits enter z as they are

    def objective(theta: np.ndarray) -> tuple[float, np.ndarray]:
        z = np.einsum("ncp,p->nc", jacobian, theta) + offset
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        value = -(log_p * onehot).sum() / n + ridge * np.sum((theta - anchor) ** 2)
        return value, np.exp(log_p)

    value, p = objective(theta)
    for _ in range(NEWTON_STEPS):
        gradient = np.einsum("ncp,nc->p", jacobian, p - onehot) / n + 2 * ridge * (theta - anchor)
        curvature = p[:, :, None] * np.eye(classes) - p[:, :, None] * p[:, None, :]  # [N, C, C]
        hessian = np.einsum("ncp,ncd,ndq->pq", jacobian, curvature, jacobian) / n
        # + ridge, and a hair more so that a zero-ridge fit stays solvable along b's common shift
        step = np.linalg.solve(hessian + (2 * ridge + 1e-9) * np.eye(len(theta)), gradient)
        for _ in range(30):  # damped Newton: halve the step until the objective falls (saturated softmax)
            candidate_value, candidate_p = objective(theta - step)
            if candidate_value <= value:
                break
            step = step / 2
        else:
            break
        theta, value, p = theta - step, candidate_value, candidate_p
        if np.abs(step).max() < TOLERANCE:
            break
    if temperature:
        return Calibration(theta[1:] - theta[1:].mean(), float(theta[0]))
    return Calibration(theta - theta.mean())


def calibrated_loss(
    name: scoring.LossName, logits: np.ndarray, labels: np.ndarray, metric: str = "accuracy", **fit_options: Any
) -> float:
    """The loss `name` after the best correction for these logits (fitted by cross-entropy on them)."""
    correction = fit(logits, labels, **fit_options)
    return scoring.loss(name, correction.apply(logits), labels, metric)
