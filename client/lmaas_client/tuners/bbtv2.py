"""BBTv2 (Sun et al., EMNLP 2022): deep prompts, one per layer, searched layer by layer (divide and conquer).

Layer i's prompt is A_i z_i (z_i in R^d, A_i fixed random [d, P*hidden], normal with std
alpha * std_i / (sqrt(d) * sigma)); std_0 is the word-embedding std and std_i (i >= 1) the std of the hidden
states entering layer i — the server's probe-set statistics (`ModelInfo.layer_std`), or measured on the
training set through POST /v1/layer_std (`layer_std="measured"`, one call). Prompt 0 is added to the
embeddings of P placeholder tokens (as BBT), prompt i to the hidden states at the prompt positions before
layer i (the server's deep prompts).

Schedule: one CMA-ES per layer; per round, one generation (popsize calls; `generations_per_layer` for more)
for each layer bottom-up while every other layer stays at its best point so far; after each generation a
layer is fixed at its best z.
With the paper's 8,000 calls and 24 layers that is 16 rounds. Candidates travel as z per layer plus the
layer's projection spec (server-side projection), so a candidate costs ~4*d bytes per tuned layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field

from lmaas_client.prompts import ProjectedZ, PromptCandidate
from lmaas_client.tuners import cmaes
from lmaas_client.tuners.base import FLOOR_BY_DEFAULT, TunerConfig
from lmaas_client.tuners.cmaes import CMATuner
from lmaas_client.tuners.options import CMAOptions, ProjectedPromptOptions
from lmaas_client.tuners.projection import placeholder_tokens, projection_spec
from lmaas_protocol import ModelInfo


class BBTv2Config(ProjectedPromptOptions, CMAOptions, TunerConfig):
    manual_floor: bool = FLOOR_BY_DEFAULT
    intrinsic_dim: int = Field(500, ge=1, le=100_000, description="d per layer.")
    prompt_length: int = Field(50, ge=1, le=4096, description="P prompt tokens (every layer).")
    sigma: float = Field(0.2, gt=0, description="CMA-ES initial step size (BBTv2's README: 0.2).")
    alpha: float = Field(0.2, gt=0, description="Prompt std in units of the layer's hidden-state std (0.2).")
    layers: int | None = Field(None, ge=1, description="Tune the first N layers (default: all).")
    generations_per_layer: int = Field(
        1,
        ge=1,
        le=10_000,
        description="Generations a layer gets before the schedule moves up a layer (1: the paper's schedule). "
        "With a small budget, more generations on fewer layers (see layers) search each one further.",
    )
    layer_std: Literal["model", "measured"] = Field("model", description="Where std_i comes from (see module).")


class BBTv2Tuner(CMATuner):
    name = "bbtv2"
    config_class = BBTv2Config
    config: BBTv2Config

    def __init__(self, config: BBTv2Config, model: ModelInfo):
        super().__init__(config, model)
        self.num_layers = min(config.layers or model.num_layers, model.num_layers)
        self.token_ids = placeholder_tokens(
            config.init_tokens, config.init_token_offset, config.prompt_length, model.vocab_size
        )
        stds = model.layer_std if len(model.layer_std) >= self.num_layers else [model.embedding_std] * self.num_layers
        self._set_specs(stds)
        self.strategies = [
            cmaes.strategy(
                config.intrinsic_dim,
                config.sigma,
                config.popsize,
                config.seed * 1000 + i,
                config.bound,
                config.covariance == "diagonal",
            )
            for i in range(self.num_layers)
        ]
        self.best_z: list[np.ndarray | None] = [None] * self.num_layers  # None: layer not tuned yet (adds nothing)
        self.step = 0  # generations told so far; they give the layer being tuned (`layer`)
        # serialised strategies, kept until their layer is told again: a checkpoint then re-serialises (and
        # `lmaas_client.checkpoints` re-writes) one ~4 MB strategy per generation, not all of them
        self._dumps: list[bytes | None] = [None] * self.num_layers

    def _set_specs(self, stds: Sequence[float]) -> None:
        c = self.config
        self.specs = [
            projection_spec(
                c.intrinsic_dim, c.sigma, c.alpha, stds[i], c.prompt_length, self.model.hidden_size, c.seed * 1000 + i
            )
            for i in range(self.num_layers)
        ]

    def setup(self, context) -> None:
        if self.config.layer_std == "measured" and not context.resumed:
            handle = context.client.register_inputs(context.scorer.inputs_spec(context.train)).handle
            self._set_specs(context.client.layer_std(handle).layer_std)

    @property
    def layer(self) -> int:
        return (self.step // self.config.generations_per_layer) % self.num_layers

    def strategy(self):
        return self.strategies[self.layer]

    def prompt(self, z: np.ndarray, layer: int | None = None) -> PromptCandidate:
        """Layer `layer`'s (default: the one tuned now) prompt at z, every other layer at its best point."""
        layer = self.layer if layer is None else layer
        points = list(self.best_z)
        points[layer] = np.asarray(z, dtype=np.float64)
        deep = [None if p is None else ProjectedZ(p, spec) for p, spec in zip(points, self.specs, strict=True)]
        return PromptCandidate(token_ids=self.token_ids, deep=deep, z=points[layer], wire_dtype=self.config.wire_dtype,
                               meta={"tuned_layer": layer})  # fmt: skip

    def update(self, losses: Sequence[float], logits: Sequence[np.ndarray] | None = None) -> None:
        super().update(losses, logits)  # the current layer's strategy is told
        self._dumps[self.layer] = None
        self.best_z[self.layer] = np.array(self.strategy().result.xbest, dtype=np.float64)  # fixed at its best now
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {
            "strategies": self._serialised_strategies(),
            "best_z": self.best_z,
            "step": self.step,
            "pending": self._pending,
            "specs": [s.model_dump() for s in self.specs],
        }

    def _serialised_strategies(self) -> list[bytes]:
        for i, data in enumerate(self._dumps):
            if data is None:
                self._dumps[i] = cmaes.dumps(self.strategies[i])
        return list(self._dumps)  # type: ignore[arg-type]

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategies = [cmaes.loads(data) for data in state["strategies"]]
        self._dumps = list(state["strategies"])
        self.best_z, self.step, self._pending = state["best_z"], state["step"], state["pending"]
        self.specs = [type(self.specs[0]).model_validate(s) for s in state["specs"]]
