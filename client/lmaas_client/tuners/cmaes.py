"""The CMA-ES kernel: pycma strategies that never touch numpy's global RNG (so runs are reproducible side by
side and resumable), and `CMATuner`, the ask/tell base of every CMA method (BBT, BBTv2, DePT, GDFO)."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any

import cma
import numpy as np

from lmaas_client import checkpoints
from lmaas_client.prompts import PromptCandidate
from lmaas_client.tuners.base import Tuner


class SeededGaussian:
    """pycma's `randn(*shape)` drawn from a private PCG64 generator (pickled with the strategy)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def strategy(
    dim: int, sigma: float, popsize: int, seed: int, bound: float | None = None, diagonal: bool = False
) -> cma.CMAEvolutionStrategy:
    """CMA-ES from x0 = 0 with step size `sigma` and population `popsize` (BBT's settings); `diagonal`: pycma's
    separable variant (a diagonal covariance for the whole run)."""
    options: dict[str, Any] = {
        "popsize": popsize,
        "randn": SeededGaussian(seed),
        "seed": np.nan,  # nan: pycma leaves numpy's global RNG alone
        "verbose": -9,
        "verb_log": 0,  # no outcmaes/ files
        "verb_disp": 0,
        # No mirrored sampling (pycma's default below popsize 6): it injects directions that a budget ending
        # mid-generation would leave unused, and BBT's population of 20 never uses it anyway.
        "CMA_mirrors": 0,
    }
    if bound is not None:
        options["bounds"] = [-bound, bound]
    if diagonal:
        options["CMA_diagonal"] = True  # True: diagonal for the whole run (a number would mean "until iteration N")
    return cma.CMAEvolutionStrategy(np.zeros(dim), sigma, options)


def dumps(es: cma.CMAEvolutionStrategy) -> bytes:
    """pycma's own serialisation, read back by `loads` under the checkpoint allow-list."""
    return es.pickle_dumps()


def loads(data: bytes) -> cma.CMAEvolutionStrategy:
    return checkpoints.loads(data, "a saved CMA-ES state")


class CMATuner(Tuner):
    """A pycma strategy over a vector z, each z turned into a prompt by `prompt(z)`.

    One strategy (`self.es`) for BBT, DePT and GDFO; BBTv2 keeps one per layer and `strategy()` names the
    one that asks and is told now. The base's tell() has checked the loss count before `update`.
    """

    es: Any

    @abstractmethod
    def prompt(self, z: np.ndarray) -> PromptCandidate: ...

    def strategy(self) -> cma.CMAEvolutionStrategy:
        """The strategy that asks and is told now."""
        return self.es

    # candidates before the strategy's own in the last ask() (the scored mean), stripped again in tell()
    _extra: int = 0

    def ask(self) -> list[PromptCandidate]:
        es = self.strategy()
        self._pending = es.ask()
        candidates = [self.prompt(z) for z in self._pending]
        self._extra = int(bool(getattr(self.config, "score_mean", False)))
        if self._extra:
            # first, so that a budget ending mid-generation still scores it
            candidates.insert(0, self.prompt(self._mean(es)))
        return candidates

    def _mean(self, es: cma.CMAEvolutionStrategy) -> np.ndarray:
        """The strategy's mean (where this generation was sampled around), inside the box bound if any."""
        mean = np.array(es.mean, dtype=np.float64)
        bound = getattr(self.config, "bound", None)
        return mean if bound is None else np.clip(mean, -bound, bound)

    def tell(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        """As `Tuner.tell`, for every candidate of the last ask(): a scored mean's loss is dropped here."""
        extra, self._extra = self._extra, 0
        super().tell(losses[extra:], None if logits is None else logits[extra:])

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        self.strategy().tell(self._pending, [float(v) for v in losses])

    def state_dict(self) -> dict[str, Any]:
        return {
            "es": dumps(self.es),  # includes its SeededGaussian and that generator's state
            "pending": self._pending,
            "best_z": None if self.best is None else self.best.z,
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es = loads(state["es"])
        self._pending = state["pending"]
        best_z = state.get("best_z")  # absent from DePT checkpoints of before this class
        self.best = None if best_z is None else self.prompt(best_z)
        self.best_loss = state.get("best_loss", float("inf"))
