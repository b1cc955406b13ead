"""Candidates: the prompts a request scores, in every form the tuning methods need.

A candidate fills the template's {prompt} slot with P positions and may carry, all optional:

- `prompt_token_ids` [P]: discrete tokens at the prompt positions (BDPL);
- `soft_prompt` [P, hidden]: vectors at the prompt positions, *added* to the token ids' embeddings when
  both are given (BBT's "add" mode), else standing alone (a pure soft prompt, BBT's "cat");
- `deep_prompt`: one [P, hidden] tensor per layer (BBTv2); entry 0 is added to the word embeddings at the
  prompt positions (like `soft_prompt`), entry i >= 1 to the hidden states entering layer i; null entries
  and missing trailing layers add nothing;
- `embedding_offset`: a low-rank offset scale * A B (A [s, r], B [r, hidden]) added position-wise to the
  word embeddings of the example's own tokens (DePT); row j goes to the j-th non-prompt token;
- nothing: the empty slot, i.e. the manual-prompt baseline.

Every tensor may be sent as raw values or as `{"z", "projection"}` (server-side projection): the server
materializes A from the spec (see `projection.py`) and uses (z @ A).reshape(shape).
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Discriminator, Field, Tag, model_validator

from lmaas_protocol.base import FieldError, WireModel
from lmaas_protocol.projection import Projected, ProjectionSpec
from lmaas_protocol.tensors import FLOAT_DTYPES, Tensor

MAX_PROMPT_TOKENS = 4096
MAX_LAYERS = 1024
MAX_TOKEN_ID = 2**31 - 1


def _tensor_kind(value: Any) -> str:
    if isinstance(value, dict):
        return "projected" if "z" in value or "projection" in value else "tensor"
    return "projected" if isinstance(value, Projected) else "tensor"


PromptTensor = Annotated[
    Annotated[Tensor, Tag("tensor")] | Annotated[Projected, Tag("projected")],
    Discriminator(_tensor_kind),
]


class LowRankOffset(WireModel):
    a: PromptTensor = Field(description="[s, r]: one row per example token position.")
    b: PromptTensor = Field(description="[r, hidden].")
    scale: float = Field(1.0, ge=-1e6, le=1e6, description="DePT: lora_alpha / sqrt(r).")


class Candidate(WireModel):
    prompt_token_ids: list[int] | None = Field(None, max_length=MAX_PROMPT_TOKENS)
    soft_prompt: PromptTensor | None = None
    deep_prompt: list[PromptTensor | None] | None = Field(None, min_length=1, max_length=MAX_LAYERS)
    embedding_offset: LowRankOffset | None = None

    @model_validator(mode="after")
    def _shapes(self) -> Candidate:
        if not self.uses_named_projections:  # else the request checks it, knowing its projections
            check_candidate(self, {})
        return self

    @property
    def uses_named_projections(self) -> bool:
        return any(isinstance(t, Projected) and isinstance(t.projection, str) for _, t in self.prompt_tensors())

    def prompt_tensors(self) -> list[tuple[str, Tensor | Projected]]:
        """(param path, tensor) of every tensor the candidate carries."""
        found: list[tuple[str, Tensor | Projected]] = []
        if self.soft_prompt is not None:
            found.append(("soft_prompt", self.soft_prompt))
        for i, entry in enumerate(self.deep_prompt or ()):
            if entry is not None:
                found.append((f"deep_prompt.{i}", entry))
        if self.embedding_offset is not None:
            found += [("embedding_offset.a", self.embedding_offset.a), ("embedding_offset.b", self.embedding_offset.b)]
        return found

    def prompt_length(self, projections: dict[str, ProjectionSpec] | None = None) -> int:
        """P, the number of prompt positions (0: the empty slot)."""
        if self.prompt_token_ids is not None:
            return len(self.prompt_token_ids)
        for name, tensor in self.prompt_tensors():
            if not name.startswith("embedding_offset"):
                return shape_of(tensor, projections)[0]
        return 0


def spec_of(tensor: Projected, projections: dict[str, ProjectionSpec] | None) -> ProjectionSpec:
    """The projection spec of a projected tensor (inline, or by name from the request's `projections`)."""
    if isinstance(tensor.projection, ProjectionSpec):
        return tensor.projection
    return (projections or {})[tensor.projection]


def shape_of(tensor: Tensor | Projected, projections: dict[str, ProjectionSpec] | None = None) -> list[int]:
    return tensor.shape if isinstance(tensor, Tensor) else spec_of(tensor, projections).shape


def check_candidate(candidate: Candidate, projections: dict[str, ProjectionSpec], prefix: str = "") -> None:
    """Check projection names and every shape (names stay names); FieldError names the parameter,
    relative to the candidate, or under `prefix` (e.g. "candidates.3")."""
    for name, tensor in candidate.prompt_tensors():
        if isinstance(tensor, Projected):
            _check_projected(tensor, f"{prefix}{name}", projections)
        elif tensor.dtype not in FLOAT_DTYPES:
            raise FieldError(f"{prefix}{name}.dtype", f"must be a float dtype, got {tensor.dtype}")
    for j, token in enumerate(candidate.prompt_token_ids or ()):
        if not 0 <= token <= MAX_TOKEN_ID:
            raise FieldError(f"{prefix}prompt_token_ids.{j}", f"token id {token} is out of range")
    length = len(candidate.prompt_token_ids) if candidate.prompt_token_ids is not None else None
    first_width = None  # (name, hidden size) of the first tensor seen
    for name, tensor in candidate.prompt_tensors():
        shape = shape_of(tensor, projections)
        if len(shape) != 2:
            raise FieldError(f"{prefix}{name}.shape", f"must be 2-D, got {shape}")
        if name == "embedding_offset.a":
            continue
        if name != "embedding_offset.b":
            if length is not None and shape[0] != length:
                raise FieldError(
                    f"{prefix}{name}.shape", f"{shape[0]} prompt rows, but the prompt has {length} positions"
                )
            length = shape[0]
        if first_width is not None and shape[1] != first_width[1]:
            raise FieldError(
                f"{prefix}{name}.shape", f"hidden size {shape[1]} differs from {first_width[1]} of {first_width[0]}"
            )
        first_width = first_width or (name, shape[1])
    offset = candidate.embedding_offset
    if offset is not None:
        a, b = shape_of(offset.a, projections), shape_of(offset.b, projections)
        if a[1] != b[0]:
            raise FieldError(f"{prefix}embedding_offset.b.shape", f"needs {a[1]} rows (A's rank), got {b[0]}")


def _check_projected(tensor: Projected, param: str, projections: dict[str, ProjectionSpec]) -> None:
    if isinstance(tensor.projection, str) and tensor.projection not in projections:
        raise FieldError(f"{param}.projection", f"no projection named {tensor.projection!r} in the request")
    spec = spec_of(tensor, projections)
    if tensor.z.shape != [spec.dim]:
        raise FieldError(f"{param}.z.shape", f"must be [{spec.dim}] (the projection's dim), got {tensor.z.shape}")
