"""Overflow bounds checked before any work: a candidate whose prompt could overflow to Inf once the server
projects, adds or multiplies it is rejected (422, not charged) before the reservation, so a projection is
never materialized for a request that then fails on overflow.

The bounds are exact upper bounds on |value| of each prompt tensor the decoder builds (in float64, with a
margin for float32 rounding), compared with half the largest finite value of the model's dtype (the other
half is headroom for the token embeddings the prompt is added to).
"""

from __future__ import annotations

import math

import numpy as np

from lmaas_protocol import Candidate, Projected, ProjectionSpec, Tensor
from lmaas_protocol.candidates import spec_of
from lmaas_server.errors import InvalidRequest

# The largest |N(0, 1)| of the protocol's Box-Muller: its uniforms are >= 2^-54, so the radius
# sqrt(-2 ln u) is at most sqrt(108 ln 2) = 8.65.
NORMAL_MAX = math.sqrt(-2.0 * math.log(2.0**-54))
FLOAT32_EPS = 2.0**-23


def tensor_bound(tensor: Tensor | Projected, projections: dict[str, ProjectionSpec] | None) -> float:
    """An upper bound on |value| of the decoded tensor ([P, hidden] or a factor of an offset)."""
    if isinstance(tensor, Tensor):
        values = np.abs(np.asarray(tensor.to_numpy(), dtype=np.float64))
        return float(values.max()) if values.size else 0.0
    spec = spec_of(tensor, projections)
    z = np.abs(np.asarray(tensor.z.to_numpy(), dtype=np.float64))
    element = spec.scale * (NORMAL_MAX if spec.distribution == "normal" else 1.0)  # max |A_ij|
    return float(z.sum()) * element * (1.0 + spec.dim * FLOAT32_EPS)  # |A z| <= ||z||_1 max|A|, plus rounding


def candidate_bounds(candidate: Candidate, projections: dict[str, ProjectionSpec] | None) -> dict[str, float]:
    """Bounds of what the decoder builds: the word-embedding-level prompt (soft_prompt + deep_prompt.0), each
    deeper layer's prompt, and the low-rank offset scale * a @ b (computed in float32)."""
    bounds: dict[str, float] = {}
    word_level = [t for t in (candidate.soft_prompt, (candidate.deep_prompt or [None])[0]) if t is not None]
    if word_level:
        bounds["soft_prompt"] = sum(tensor_bound(t, projections) for t in word_level)
    for layer, entry in enumerate(candidate.deep_prompt or ()):
        if layer and entry is not None:
            bounds[f"deep_prompt.{layer}"] = tensor_bound(entry, projections)
    offset = candidate.embedding_offset
    if offset is not None:
        rank = offset.a.shape[1] if isinstance(offset.a, Tensor) else spec_of(offset.a, projections).shape[1]
        product = rank * tensor_bound(offset.a, projections) * tensor_bound(offset.b, projections)
        bounds["embedding_offset.a @ b"] = product * (1.0 + rank * FLOAT32_EPS)
        bounds["embedding_offset"] = bounds["embedding_offset.a @ b"] * abs(offset.scale)
    return bounds


def check_bounds(candidate: Candidate, param: str, projections, dtype_max: float) -> None:
    """422 when any decoded value could exceed half of `dtype_max` (float32 for intermediate products)."""
    float32_max = float(np.finfo(np.float32).max)
    for name, bound in candidate_bounds(candidate, projections).items():
        limit = float32_max if name == "embedding_offset.a @ b" else dtype_max / 2
        if not bound <= limit:  # also NaN
            raise InvalidRequest(
                param,
                f"the prompt's values could overflow to Inf or NaN once projected or multiplied: |{name}| may "
                f"reach {bound:.3g}, above {limit:.3g} for this model's dtype",
            )
