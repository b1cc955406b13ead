"""The tuner interface: ask/tell objects that hold their own state and can be checkpointed.

A tuner never talks to the server. The runner asks it for candidate prompts, scores them through the
API (one call each) and tells it the losses; `state_dict()` captures everything needed to continue.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from lmaas_client.metrics import LossName
from lmaas_protocol import Candidate, ModelInfo, Projected, ProjectionSpec, Tensor


@dataclass
class PromptCandidate:
    """One prompt for the template's {prompt} slot: soft vectors [P, hidden] and/or discrete token ids [P].

    With `projection` set and no `soft`, the soft prompt travels as z plus a projection spec (server-side
    projection: ~4*d bytes instead of 4*P*hidden); the server computes A z with the same A.
    """

    soft: np.ndarray | None = None
    token_ids: list[int] | None = None
    z: np.ndarray | None = None  # the low-dimensional point it came from, if any
    projection: ProjectionSpec | None = None  # maps z to the soft prompt on the server
    wire_dtype: str = "float32"  # dtype of soft / z on the wire (float16 halves the upload)

    def to_wire(self, projection_names: dict[tuple, str] | None = None) -> Candidate:
        """The wire form; projected candidates name their spec (`projection_names[spec.key()]`)."""
        soft: Tensor | Projected | None = None
        if self.soft is not None:
            soft = Tensor.from_numpy(self.soft, dtype=self.wire_dtype)  # type: ignore[arg-type]
        elif self.projection is not None and self.z is not None:
            name = (projection_names or {}).get(self.projection.key())
            z = Tensor.from_numpy(self.z, dtype=self.wire_dtype)  # type: ignore[arg-type]
            soft = Projected(z=z, projection=name or self.projection)
        return Candidate(soft_prompt=soft, prompt_token_ids=self.token_ids)

    @property
    def length(self) -> int:
        if self.soft is not None:
            return self.soft.shape[0]
        if self.projection is not None:
            return self.projection.shape[0]
        return len(self.token_ids or ())


def projection_names(candidates: Sequence[PromptCandidate]) -> dict[tuple, str]:
    """A short name per distinct projection spec of `candidates` (sent once per request)."""
    names: dict[tuple, str] = {}
    for candidate in candidates:
        if candidate.projection is not None and candidate.soft is None:
            names.setdefault(candidate.projection.key(), f"p{len(names)}")
    return names


class TunerConfig(BaseModel):
    """Fields shared by every tuner; subclasses add their own."""

    model_config = ConfigDict(extra="forbid")

    seed: int = Field(42, description="Seeds the projection and the optimizer.")
    loss: LossName = Field("ce", description="ce, hinge or perf (-metric).")


class Tuner(ABC):
    name: ClassVar[str]
    config_class: ClassVar[type[TunerConfig]]

    def __init__(self, config: TunerConfig, model: ModelInfo):
        self.config = config
        self.model = model
        self.best: PromptCandidate | None = None
        self.best_loss = float("inf")

    @abstractmethod
    def ask(self) -> list[PromptCandidate]:
        """The next candidates to score (one API call each)."""

    @abstractmethod
    def tell(self, losses: Sequence[float]) -> None:
        """The losses of the candidates of the last ask(), in order."""

    def observe(self, candidates: Sequence[PromptCandidate], losses: Sequence[float]) -> None:
        """Track the lowest-loss candidate seen, including ones that are not told (a budget's last partial ask)."""
        for candidate, value in zip(candidates, losses, strict=True):
            if value < self.best_loss:
                self.best, self.best_loss = candidate, float(value)

    def materialize(self, candidate: PromptCandidate) -> PromptCandidate:
        """The candidate with its tensors computed locally (for saving a portable prompt)."""
        return candidate

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
