"""pycma strategies that never touch numpy's global RNG, so runs are reproducible side by side and resumable."""

from __future__ import annotations

from typing import Any

import cma
import numpy as np

from lmaas_client import checkpoints


class SeededGaussian:
    """pycma's `randn(*shape)` drawn from a private PCG64 generator (pickled with the strategy)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def strategy(dim: int, sigma: float, popsize: int, seed: int, bound: float | None = None) -> cma.CMAEvolutionStrategy:
    """CMA-ES from x0 = 0 with step size `sigma` and population `popsize` (BBT's settings)."""
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
    return cma.CMAEvolutionStrategy(np.zeros(dim), sigma, options)


def dumps(es: cma.CMAEvolutionStrategy) -> bytes:
    """pycma's own serialisation, read back by `loads` under the checkpoint allow-list."""
    return es.pickle_dumps()


def loads(data: bytes) -> cma.CMAEvolutionStrategy:
    return checkpoints.loads(data, "a saved CMA-ES state")
