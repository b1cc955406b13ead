"""BBT (Sun et al., ICML 2022): CMA-ES on z in R^d, prompt = A z reshaped to [P, hidden].

A is a fixed random (d x P*hidden) matrix, normal with std alpha * embedding_std / (sqrt(d) * sigma), so
each prompt element has std ~ alpha * embedding_std when z ~ N(0, sigma^2 I) (the BBT code's scaling).
A comes from the protocol's deterministic generator, so by default only z and A's spec travel and the
server computes A z (server-side projection); `projection_site="client"` sends A z instead.
The prompt is *added* to the embeddings of P placeholder tokens (BBT's "add" mode; the BBT code uses
vocabulary ids 1000..1000+P-1), or stands alone as a pure soft prompt (init_tokens="none").
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from typing import Any, Literal

import cma
import numpy as np
from pydantic import Field

from lmaas_client.tuners.base import PromptCandidate, Tuner, TunerConfig, register_tuner
from lmaas_protocol import ModelInfo, ProjectionSpec, materialize, project


class BBTConfig(TunerConfig):
    intrinsic_dim: int = Field(500, ge=1, le=100_000, description="d, the dimension CMA-ES searches.")
    prompt_length: int = Field(50, ge=1, le=4096, description="P prompt tokens.")
    popsize: int = Field(20, ge=2, le=1024, description="CMA-ES population: candidates per generation.")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size.")
    alpha: float = Field(1.0, gt=0, description="Prompt element std, in units of the embedding std.")
    bound: float | None = Field(None, gt=0, description="Box bound on z (the paper: 5); None = unbounded.")
    init_tokens: Literal["vocab", "none"] = Field("vocab", description="Placeholder tokens under the prompt.")
    init_token_offset: int = Field(1000, ge=0, description="First placeholder token id (BBT: 1000).")
    projection_site: Literal["server", "client"] = Field(
        "server", description="server: send z and the projection spec (4*d bytes); client: send A z."
    )
    wire_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of z / A z on the wire.")


@register_tuner
class BBTTuner(Tuner):
    name = "bbt"
    config_class = BBTConfig
    config: BBTConfig

    def __init__(self, config: BBTConfig, model: ModelInfo):
        super().__init__(config, model)
        self.spec = projection_spec(config, model)
        self._matrix: np.ndarray | None = None  # A [d, P*hidden], materialized only when needed here
        self.token_ids = placeholder_tokens(config, model.vocab_size)
        self.es = cma.CMAEvolutionStrategy(np.zeros(config.intrinsic_dim), config.sigma, self._cma_options())
        self._pending: list[np.ndarray] | None = None

    def _cma_options(self) -> dict[str, Any]:
        c = self.config
        options: dict[str, Any] = {
            "popsize": c.popsize,
            # Own seeded generator: pycma's `seed` would reseed and then draw from numpy's global RNG.
            "randn": SeededGaussian(c.seed),
            "seed": np.nan,  # nan: pycma leaves numpy's global RNG alone
            "verbose": -9,
            "verb_log": 0,
            "verb_disp": 0,
        }
        if c.bound is not None:
            options["bounds"] = [-c.bound, c.bound]
        return options

    @property
    def projection(self) -> np.ndarray:
        if self._matrix is None:
            self._matrix = materialize(self.spec)
        return self._matrix

    def prompt(self, z: np.ndarray) -> PromptCandidate:
        z = np.asarray(z, dtype=np.float64)
        candidate = PromptCandidate(token_ids=self.token_ids, z=z, wire_dtype=self.config.wire_dtype)
        if self.config.projection_site == "server":
            candidate.projection = self.spec
            return candidate
        return self.materialize(candidate)

    def materialize(self, candidate: PromptCandidate) -> PromptCandidate:
        if candidate.soft is not None or candidate.z is None:
            return candidate
        soft = project(candidate.z, self.projection, self.spec)  # [P, hidden], same A as the server's
        return PromptCandidate(soft, candidate.token_ids, candidate.z, wire_dtype=candidate.wire_dtype)

    def ask(self) -> list[PromptCandidate]:
        self._pending = self.es.ask()
        return [self.prompt(z) for z in self._pending]

    def tell(self, losses: Sequence[float]) -> None:
        if self._pending is None or len(losses) != len(self._pending):
            raise ValueError("tell() needs one loss per candidate of the last ask()")
        self.es.tell(self._pending, [float(v) for v in losses])
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {
            # pycma's own serialisation of its state; written only to the user's own checkpoint files.
            "es": self.es.pickle_dumps(),  # includes its SeededGaussian and that generator's state
            "pending": self._pending,
            "best_z": None if self.best is None else self.best.z,
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es = pickle.loads(state["es"])
        self._pending = state["pending"]
        self.best = None if state["best_z"] is None else self.prompt(state["best_z"])
        self.best_loss = state["best_loss"]


class SeededGaussian:
    """pycma's `randn(*shape)` drawn from a private PCG64 generator (picklable with the strategy)."""

    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)

    def __call__(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape)


def projection_spec(config: BBTConfig, model: ModelInfo) -> ProjectionSpec:
    """A ~ N(0, (alpha * embedding_std / (sqrt(d) * sigma))^2), [d, P*hidden], from the protocol's generator."""
    scale = config.alpha * model.embedding_std / (np.sqrt(config.intrinsic_dim) * config.sigma)
    return ProjectionSpec(
        seed=config.seed,
        distribution="normal",
        scale=float(scale),
        dim=config.intrinsic_dim,
        shape=[config.prompt_length, model.hidden_size],
    )


def placeholder_tokens(config: BBTConfig, vocab_size: int) -> list[int] | None:
    if config.init_tokens == "none":
        return None
    return [(config.init_token_offset + i) % vocab_size for i in range(config.prompt_length)]
