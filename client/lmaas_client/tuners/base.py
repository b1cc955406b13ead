"""The tuner interface: ask/tell objects that hold their own state and can be checkpointed.

A tuner never talks to the server directly. The run (`lmaas_client.run`) asks it for candidate prompts,
scores them through the API on the training set (one call each) and tells it the losses (and the
label-word logits, which distillation-based methods use); `state_dict()` captures everything needed to
continue exactly.
Methods without a black-box search (baselines) do their work in `setup()` and ask for nothing.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lmaas_client.prompts import PromptCandidate
from lmaas_client.selection import SelectName
from lmaas_protocol import ModelInfo
from lmaas_protocol.scoring import LossName

if TYPE_CHECKING:
    from lmaas_client.context import TuneContext


class TunerConfig(BaseModel):
    """Fields shared by every tuner; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(42, description="Seeds the projection and the optimizer.")
    loss: LossName = Field("ce", description="ce, hinge or perf (-metric).")
    calibrate: bool = Field(
        True,
        description="Score each candidate after its own best class bias, fitted on the training logits the "
        "API returns anyway (zero calls); dev selection and test use the selected prompt's calibration, which "
        "prompt.npz keeps. On by default: measured, it removes BBT's early dip below the manual prompt and "
        "halves its spread over seeds on SST-2, and adds 3 points at 300 calls on AG News (BENCHMARKS.md).",
    )
    select: SelectName = Field(
        "dev",
        description="Which best-so-far prompt the run hands over: dev (highest dev metric, BBT's way), dev-loss, "
        "train+dev (lowest loss over both) or train (no dev calls: lowest training loss).",
    )
    manual_floor: bool = Field(
        False,
        description="The manual prompt (calibrated when the run calibrates) competes in dev selection from the "
        "start: a tuned prompt is handed over only if it scores strictly better on dev (one dev call). Ignored "
        "with select=train. On by default for bbt, bbtv2, bdpl and dept: it lifted the runs that ended below the "
        "manual prompt and lowered no calibrated run at 100 calls or more (BENCHMARKS.md); off for gdfo "
        "(not measured).",
    )


# manual_floor for the methods where it was measured (no calibrated run lower from 100 calls on): on by default
FLOOR_BY_DEFAULT = Field(True, description=TunerConfig.model_fields["manual_floor"].description)


class Tuner(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[TunerConfig]]
    black_box: ClassVar[bool] = True  # False: a baseline that spends no API calls on search
    # the points behind the last ask()'s candidates, one per candidate (set by ask(), cleared by tell());
    # a method's state_dict saves it
    _pending: Any = None

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

    def tell(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        """The losses (and [examples, classes] logits) of the candidates of the last ask(), in order.

        Checked here once for every method: a search method gets exactly one loss per asked candidate.
        """
        if self.black_box and (self._pending is None or len(losses) != len(self._pending)):
            raise ValueError("tell() needs one loss per candidate of the last ask()")
        self.update(losses, logits)
        self._pending = None

    @abstractmethod
    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None) -> None:
        """The method's step on a checked tell(); `self._pending` still holds the last ask()'s points."""

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
