"""Core types of the client: a prompt candidate in every form the server accepts, and its wire naming.

Tuners produce `PromptCandidate`s, the scorer sends them (`to_wire`), the run saves the best one
(`prompt_io`). They live here, outside `tuners/`, so scoring and saving never import a tuner.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from lmaas_protocol import Candidate, LowRankOffset, Projected, ProjectionSpec, Tensor, materialize, project


@dataclass
class ProjectedZ:
    """A tensor sent as z plus its projection spec; the server (or `materialized`) computes A z."""

    z: np.ndarray  # [d]
    spec: ProjectionSpec


Part = np.ndarray | ProjectedZ


@dataclass
class LowRank:
    """DePT's embedding offset scale * A B, A [s, r], B [r, hidden]."""

    a: Part
    b: Part
    scale: float = 1.0


@dataclass
class PromptCandidate:
    """One prompt for the template's {prompt} slot, in any of the forms the server accepts.

    token_ids [P] discrete tokens (BDPL); soft [P, hidden] added to them (BBT); deep, one [P, hidden]
    per layer (BBTv2); offset, a low-rank offset of the example's own token embeddings (DePT). Each
    tensor is an array or a ProjectedZ (server-side projection: ~4*d bytes on the wire).
    """

    token_ids: list[int] | None = None
    soft: Part | None = None
    deep: list[Part | None] | None = None
    offset: LowRank | None = None
    z: np.ndarray | None = None  # the optimizer's point this came from, for the record
    wire_dtype: str = "float32"  # float16 halves the upload
    meta: dict[str, Any] = field(default_factory=dict)  # method-specific notes saved with the prompt

    @property
    def empty(self) -> bool:
        """Nothing fills the {prompt} slot: the manual prompt itself."""
        return self.token_ids is None and not self.parts()

    def parts(self) -> list[Part]:
        found = [p for p in (self.soft, *(self.deep or ())) if p is not None]
        return found + ([self.offset.a, self.offset.b] if self.offset is not None else [])

    def specs(self) -> list[ProjectionSpec]:
        return [p.spec for p in self.parts() if isinstance(p, ProjectedZ)]

    def to_wire(self, projection_names: dict[tuple, str] | None = None) -> Candidate:
        """The wire form; projected tensors name their spec (`projection_names[spec.key()]`) if given."""

        def wire(part: Part | None) -> Tensor | Projected | None:
            if part is None:
                return None
            if isinstance(part, ProjectedZ):
                name = (projection_names or {}).get(part.spec.key())
                return Projected(z=Tensor.from_numpy(part.z, dtype=self.wire_dtype), projection=name or part.spec)  # type: ignore[arg-type]
            return Tensor.from_numpy(part, dtype=self.wire_dtype)  # type: ignore[arg-type]

        offset = None
        if self.offset is not None:
            offset = LowRankOffset(a=wire(self.offset.a), b=wire(self.offset.b), scale=self.offset.scale)
        deep = [wire(p) for p in self.deep] if self.deep is not None else None
        return Candidate(
            prompt_token_ids=self.token_ids, soft_prompt=wire(self.soft), deep_prompt=deep, embedding_offset=offset
        )

    def materialized(self) -> PromptCandidate:
        """The same prompt with every projected tensor computed here (A from the protocol's generator)."""

        def local(part: Part | None) -> np.ndarray | None:
            if isinstance(part, ProjectedZ):
                return project(part.z, materialize(part.spec), part.spec)
            return part

        offset = None if self.offset is None else LowRank(local(self.offset.a), local(self.offset.b), self.offset.scale)
        deep = [local(p) for p in self.deep] if self.deep is not None else None
        return replace(self, soft=local(self.soft), deep=deep, offset=offset)

    @property
    def length(self) -> int:
        if self.token_ids is not None:
            return len(self.token_ids)
        for part in (self.soft, *(self.deep or ())):
            if part is not None:
                return part.spec.shape[0] if isinstance(part, ProjectedZ) else part.shape[0]
        return 0


def projection_names(candidates: Sequence[PromptCandidate]) -> dict[tuple, str]:
    """A short name per distinct projection spec of `candidates` (sent once per request)."""
    names: dict[tuple, str] = {}
    for candidate in candidates:
        for spec in candidate.specs():
            names.setdefault(spec.key(), f"p{len(names)}")
    return names


def named_specs(candidates: Sequence[PromptCandidate], names: dict[tuple, str]) -> dict[str, ProjectionSpec]:
    specs = {spec.key(): spec for c in candidates for spec in c.specs()}
    return {name: specs[key] for key, name in names.items()}
