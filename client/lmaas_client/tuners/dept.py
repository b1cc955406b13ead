"""Black-box DePT (after Shi & Lipani, ICLR 2024): a short soft prompt plus a low-rank offset of the input
token embeddings, searched together with one CMA-ES in projected subspaces.

DePT splits a long prompt into a shorter prompt (m tokens) and an offset scale * A B (A [s, r],
B [r, hidden], scale = lora_alpha / sqrt(r)) added position-wise to the frozen embeddings of the input's
own tokens. No reference trains it without gradients; here one CMA-ES searches z = [z_p, z_a, z_b]:
- the prompt is A_p z_p (server-side projection, as BBT), added to m placeholder tokens;
- A = A0 + P_a z_a and B = P_b z_b, where A0 is fixed random and P_a, P_b are fixed random projections
  (all from the protocol's deterministic generator). As LoRA initialises one factor randomly and the
  other at zero, the offset starts at exactly zero and is linear in z_b around the start, so CMA-ES gets a
  signal from the first generation (with both factors at zero the product would be flat there).
  A and B are small (s*r and r*hidden values) and travel as raw tensors.
- P_b's scale makes the offset's elements ~ beta * embedding_std for z ~ N(0, sigma^2 I).
The offset changes the text's own embeddings, so the server cannot reuse a cached text prefix for it.
"""

from __future__ import annotations

import numpy as np
from pydantic import Field

from lmaas_client.prompts import LowRank, ProjectedZ, PromptCandidate
from lmaas_client.tuners import cmaes
from lmaas_client.tuners.base import FLOOR_BY_DEFAULT, TunerConfig
from lmaas_client.tuners.cmaes import CMATuner
from lmaas_client.tuners.options import CMAOptions, ProjectedPromptOptions
from lmaas_client.tuners.projection import placeholder_tokens, projection_spec
from lmaas_protocol import ModelInfo, ProjectionSpec, materialize, project


class DePTConfig(ProjectedPromptOptions, CMAOptions, TunerConfig):
    manual_floor: bool = FLOOR_BY_DEFAULT
    prompt_length: int = Field(8, ge=1, le=4096, description="m, the short prompt.")
    prompt_dim: int = Field(300, ge=1, description="d of the prompt's subspace.")
    offset_rank: int = Field(4, ge=1, le=256, description="r.")
    offset_length: int = Field(128, ge=1, description="s: token positions the offset covers.")
    offset_a_dim: int = Field(50, ge=1, description="d of A's subspace.")
    offset_b_dim: int = Field(150, ge=1, description="d of B's subspace.")
    lora_alpha: float = Field(8.0, gt=0, description="scale = lora_alpha / sqrt(r) (DePT's default 8).")
    beta: float = Field(0.5, gt=0, description="Offset element std in units of the embedding std.")


class DePTTuner(CMATuner):
    name = "dept"
    config_class = DePTConfig
    config: DePTConfig

    def __init__(self, config: DePTConfig, model: ModelInfo):
        super().__init__(config, model)
        c = config
        self.prompt_spec = projection_spec(
            c.prompt_dim, c.sigma, c.alpha, model.embedding_std, c.prompt_length, model.hidden_size, c.seed
        )
        self.scale = c.lora_alpha / np.sqrt(c.offset_rank)
        rows = ProjectionSpec(seed=c.seed + 1, scale=1.0, dim=1, shape=[c.offset_length, c.offset_rank])
        self.a0 = materialize(rows).reshape(c.offset_length, c.offset_rank)  # fixed random, N(0, 1)
        self.a_spec = ProjectionSpec(seed=c.seed + 2, scale=1.0 / (np.sqrt(c.offset_a_dim) * c.sigma),
                                     dim=c.offset_a_dim, shape=[c.offset_length, c.offset_rank])  # fmt: skip
        b_std = c.beta * model.embedding_std / (self.scale * np.sqrt(c.offset_rank))  # offset std ~ beta * std_e
        self.b_spec = ProjectionSpec(seed=c.seed + 3, scale=float(b_std / (np.sqrt(c.offset_b_dim) * c.sigma)),
                                     dim=c.offset_b_dim, shape=[c.offset_rank, model.hidden_size])  # fmt: skip
        self.a_matrix, self.b_matrix = materialize(self.a_spec), materialize(self.b_spec)  # small: r*(s + hidden)*d
        self.token_ids = placeholder_tokens(c.init_tokens, c.init_token_offset, c.prompt_length, model.vocab_size)
        self.es = cmaes.strategy(c.prompt_dim + c.offset_a_dim + c.offset_b_dim, c.sigma, c.popsize, c.seed, c.bound,
                                 c.covariance == "diagonal")  # fmt: skip

    def prompt(self, z: np.ndarray) -> PromptCandidate:
        c = self.config
        z = np.asarray(z, dtype=np.float64)
        z_p, z_a, z_b = np.split(z, [c.prompt_dim, c.prompt_dim + c.offset_a_dim])
        a = self.a0 + project(z_a, self.a_matrix, self.a_spec)  # [s, r]
        b = project(z_b, self.b_matrix, self.b_spec)  # [r, hidden]
        offset = LowRank(a.astype(np.float32), b.astype(np.float32), float(self.scale))
        return PromptCandidate(token_ids=self.token_ids, soft=ProjectedZ(z_p, self.prompt_spec), offset=offset, z=z,
                               wire_dtype=c.wire_dtype)  # fmt: skip
