"""Server-side random projections: a candidate may send z (d floats) plus a spec instead of A z.

A spec (seed, distribution, scale, d, output shape) names a fixed random matrix A of shape
[d, prod(shape)]; the prompt is ``(z @ A).reshape(shape)``. A is generated here, by our own counter-based
generator written out in full below (SplitMix64 over a counter, Box-Muller for normals), so the same spec
gives the same A on every machine and in every version of numpy, the server and the client: the function
is part of the protocol, pinned by a test vector. Element (i, j) of A uses counter i * prod(shape) + j.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Annotated, Literal

import numpy as np
from pydantic import Discriminator, Field, Tag, field_validator, model_validator

from lmaas_protocol.base import FieldError, WireModel
from lmaas_protocol.tensors import FLOAT_DTYPES, Tensor

MAX_PROJECTION_DIM = 100_000
MAX_PROJECTION_ELEMENTS = 1 << 30  # d * prod(shape); servers set a lower limit in their settings
CHUNK = 1 << 22  # elements generated at a time (bounded temporary memory)

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_TWO_PI = 2.0 * math.pi


class ProjectionSpec(WireModel):
    """A fixed random matrix A [dim, prod(shape)], elements i.i.d. scale * N(0, 1) or U(-scale, scale)."""

    seed: int = Field(ge=0, lt=2**63)
    distribution: Literal["normal", "uniform"] = "normal"
    scale: float = Field(gt=0, le=1e6, description="Std (normal) or half-width (uniform) of A's elements.")
    dim: int = Field(ge=1, le=MAX_PROJECTION_DIM, description="d, the length of z.")
    shape: list[int] = Field(min_length=1, max_length=3, description="Shape of A z, e.g. [P, hidden].")

    @field_validator("shape")
    @classmethod
    def _positive(cls, shape: list[int]) -> list[int]:
        if any(d < 1 for d in shape):
            raise FieldError("shape", f"dimensions must be >= 1, got {shape}")
        return shape

    @model_validator(mode="after")
    def _size(self) -> ProjectionSpec:
        if self.elements > MAX_PROJECTION_ELEMENTS:
            raise FieldError("shape", f"dim * prod(shape) = {self.elements} exceeds {MAX_PROJECTION_ELEMENTS}")
        return self

    @property
    def width(self) -> int:
        return math.prod(self.shape)

    @property
    def elements(self) -> int:
        return self.dim * self.width

    def key(self) -> tuple:
        return (self.seed, self.distribution, self.scale, self.dim, tuple(self.shape))


class Projected(WireModel):
    """z in R^d and the projection (an inline spec, or the name of one in the request's `projections`)."""

    z: Tensor
    projection: Annotated[
        Annotated[ProjectionSpec, Tag("spec")] | Annotated[str, Tag("name")],
        Discriminator(lambda value: "name" if isinstance(value, str) else "spec"),
    ]

    @field_validator("z")
    @classmethod
    def _vector(cls, z: Tensor) -> Tensor:
        if z.dtype not in FLOAT_DTYPES or len(z.shape) != 1:
            raise FieldError("z", f"must be a 1-D float tensor, got {z.dtype} {z.shape}")
        return z


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function, on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def uniform_stream(seed: int, start: int, count: int) -> np.ndarray:
    """Doubles in (0, 1) for counters start .. start+count-1 of stream `seed`."""
    with np.errstate(over="ignore"):
        key = _mix(np.array([seed], dtype=np.uint64) * _GOLDEN + _GOLDEN)[0]
        counters = np.arange(start, start + count, dtype=np.uint64)
        bits = _mix(key + counters * _GOLDEN)
    return ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))


def standard_normal_stream(seed: int, start: int, count: int) -> np.ndarray:
    """N(0, 1) samples for counters start .. start+count-1 (Box-Muller on counter pairs 2k, 2k+1)."""
    first = start - (start % 2)
    pairs = (start + count - first + 1) // 2
    u = uniform_stream(seed, first, 2 * pairs).reshape(pairs, 2)
    radius = np.sqrt(-2.0 * np.log(u[:, 0]))
    angle = _TWO_PI * u[:, 1]
    normals = np.empty((pairs, 2))
    normals[:, 0] = radius * np.cos(angle)
    normals[:, 1] = radius * np.sin(angle)
    return normals.reshape(-1)[start - first : start - first + count]


def materialize(spec: ProjectionSpec, between_chunks: Callable[[], None] | None = None) -> np.ndarray:
    """A as float32 [dim, prod(shape)]; identical bits for identical specs everywhere. `between_chunks` runs
    before each chunk of CHUNK elements (the server checks its request deadline there)."""
    total = spec.elements
    out = np.empty(total, dtype=np.float32)
    for start in range(0, total, CHUNK):
        if between_chunks is not None:
            between_chunks()
        count = min(CHUNK, total - start)
        if spec.distribution == "normal":
            values = standard_normal_stream(spec.seed, start, count) * spec.scale
        else:
            values = (2.0 * uniform_stream(spec.seed, start, count) - 1.0) * spec.scale
        out[start : start + count] = values
    return out.reshape(spec.dim, spec.width)


def project(z: np.ndarray, matrix: np.ndarray, spec: ProjectionSpec) -> np.ndarray:
    """(z @ A).reshape(shape) in float32."""
    return (np.asarray(z, dtype=np.float32) @ matrix).reshape(spec.shape)
