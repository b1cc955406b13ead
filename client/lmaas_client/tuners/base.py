"""The tuner interface: ask/tell objects that hold their own state and can be checkpointed.

A tuner never talks to the server directly. The runner asks it for candidate prompts, scores them through
the API on the training set (one call each) and tells it the losses (and the label-word logits, which
distillation-based methods use); `state_dict()` captures everything needed to continue exactly.
Methods without a black-box search (baselines) do their work in `setup()` and ask for nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lmaas_client.metrics import LossName
from lmaas_client.prompts import PromptCandidate
from lmaas_protocol import ModelInfo

if TYPE_CHECKING:
    from lmaas_client.context import TuneContext


class TunerConfig(BaseModel):
    """Fields shared by every tuner; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(42, description="Seeds the projection and the optimizer.")
    loss: LossName = Field("ce", description="ce, hinge or perf (-metric).")


class Tuner(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[TunerConfig]]
    black_box: ClassVar[bool] = True  # False: a baseline that spends no API calls on search

    def __init__(self, config: TunerConfig, model: ModelInfo):
        self.config = config
        self.model = model
        self.best: PromptCandidate | None = None
        self.best_loss = float("inf")

    def setup(self, context: TuneContext) -> None:  # noqa: B027 - optional hook
        """Called once before the first ask with the task's data and the API (e.g. to build a vocabulary)."""

    @abstractmethod
    def ask(self) -> list[PromptCandidate]:
        """The next candidates to score (one API call each); [] when there is nothing left to search."""

    @abstractmethod
    def tell(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        """The losses (and [examples, classes] logits) of the candidates of the last ask(), in order."""

    def observe(self, candidates: Sequence[PromptCandidate], losses: Sequence[float]) -> None:
        """Track the lowest-loss candidate seen, including ones that are not told (a budget's last partial ask)."""
        for candidate, value in zip(candidates, losses, strict=True):
            if value < self.best_loss:
                self.best, self.best_loss = candidate, float(value)

    @abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly where this tuner is (numpy arrays and plain values)."""

    @abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


TUNERS: dict[str, type[Tuner]] = {}


def register_tuner(cls: type[Tuner]) -> type[Tuner]:
    TUNERS[cls.name] = cls
    return cls


def make_tuner(method: str, model: ModelInfo, **options: Any) -> Tuner:
    """Build a registered tuner; unknown methods or options raise ValueError naming them."""
    if method not in TUNERS:
        raise ValueError(f"unknown method {method!r}; available: {', '.join(sorted(TUNERS))}")
    cls = TUNERS[method]
    return cls(cls.config_class(**options), model)
