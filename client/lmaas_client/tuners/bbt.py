"""BBT (Sun et al., ICML 2022): CMA-ES on z in R^d, prompt = A z reshaped to [P, hidden].

A is a fixed random (d x P*hidden) matrix, normal with std alpha * embedding_std / (sqrt(d) * sigma), so
each prompt element has std ~ alpha * embedding_std when z ~ N(0, sigma^2 I) (the BBT code's scaling).
A comes from the protocol's deterministic generator, so by default only z and A's spec travel and the
server computes A z (server-side projection); `projection_site="client"` sends A z instead.
The prompt is *added* to the embeddings of P placeholder tokens (BBT's "add" mode; the BBT code uses
vocabulary ids 1000..1000+P-1), or stands alone as a pure soft prompt (init_tokens="none").
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmaas_client.prompts import ProjectedZ, PromptCandidate
from lmaas_client.tuners import cmaes
from lmaas_client.tuners.base import Tuner, TunerConfig, register_tuner
from lmaas_protocol import ModelInfo, ProjectionSpec


class BBTConfig(TunerConfig):
    intrinsic_dim: int = Field(500, ge=1, le=100_000, description="d, the dimension CMA-ES searches.")
    prompt_length: int = Field(50, ge=1, le=4096, description="P prompt tokens.")
    popsize: int = Field(20, ge=3, le=1024, description="CMA-ES population: candidates per generation (>= 3).")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size.")
    alpha: float = Field(1.0, gt=0, description="Prompt element std, in units of the embedding std.")
    bound: float | None = Field(None, gt=0, description="Box bound on z (the paper: 5); None = unbounded.")
    init_tokens: Literal["vocab", "none"] = Field("vocab", description="Placeholder tokens under the prompt.")
    init_token_offset: int = Field(1000, ge=0, description="First placeholder token id (BBT: 1000).")
    projection_site: Literal["server", "client"] = Field(
        "server", description="server: send z and the projection spec (4*d bytes); client: send A z."
    )
    wire_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of z / A z on the wire.")


class CMATuner(Tuner):
    """One pycma strategy over a vector z, each z turned into a prompt by `prompt(z)` (BBT, DePT, GDFO)."""

    es: Any
    _pending: list[np.ndarray] | None = None

    @abstractmethod
    def prompt(self, z: np.ndarray) -> PromptCandidate: ...

    def ask(self) -> list[PromptCandidate]:
        self._pending = self.es.ask()
        return [self.prompt(z) for z in self._pending]

    def tell(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        if self._pending is None or len(losses) != len(self._pending):
            raise ValueError("tell() needs one loss per candidate of the last ask()")
        self.es.tell(self._pending, [float(v) for v in losses])
        self._pending = None

    def state_dict(self) -> dict[str, Any]:
        return {
            "es": cmaes.dumps(self.es),  # includes its SeededGaussian and that generator's state
            "pending": self._pending,
            "best_z": None if self.best is None else self.best.z,
            "best_loss": self.best_loss,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.es = cmaes.loads(state["es"])
        self._pending = state["pending"]
        best_z = state.get("best_z")  # absent from DePT checkpoints of before this class
        self.best = None if best_z is None else self.prompt(best_z)
        self.best_loss = state.get("best_loss", float("inf"))


@register_tuner
class BBTTuner(CMATuner):
    name = "bbt"
    config_class = BBTConfig
    config: BBTConfig

    def __init__(self, config: BBTConfig, model: ModelInfo):
        super().__init__(config, model)
        self.spec = projection_spec(config.intrinsic_dim, config.sigma, config.alpha, model.embedding_std,
                                    config.prompt_length, model.hidden_size, config.seed)  # fmt: skip
        self.token_ids = placeholder_tokens(
            config.init_tokens, config.init_token_offset, config.prompt_length, model.vocab_size
        )
        self.es = cmaes.strategy(config.intrinsic_dim, config.sigma, config.popsize, config.seed, config.bound)
        self._pending: list[np.ndarray] | None = None

    def prompt(self, z: np.ndarray) -> PromptCandidate:
        z = np.asarray(z, dtype=np.float64)
        candidate = PromptCandidate(
            token_ids=self.token_ids, soft=ProjectedZ(z, self.spec), z=z, wire_dtype=self.config.wire_dtype
        )
        return candidate if self.config.projection_site == "server" else candidate.materialized()


def projection_spec(
    dim: int, sigma: float, alpha: float, std: float, length: int, hidden: int, seed: int
) -> ProjectionSpec:
    """A ~ N(0, (alpha * std / (sqrt(d) * sigma))^2), [d, P*hidden]: each prompt element then has std
    ~ alpha * std when z ~ N(0, sigma^2 I). Drawn by the protocol's generator (the server's A is the same)."""
    scale = alpha * std / (np.sqrt(dim) * sigma)
    return ProjectionSpec(seed=seed, distribution="normal", scale=float(scale), dim=dim, shape=[length, hidden])


def placeholder_tokens(init: str, offset: int, length: int, vocab_size: int) -> list[int] | None:
    if init == "none":
        return None
    return [(offset + i) % vocab_size for i in range(length)]
