"""Projection helpers of the CMA methods: the BBT scaling of a random projection, and placeholder tokens."""

from __future__ import annotations

import numpy as np

from lmaas_protocol import ProjectionSpec


def projection_spec(
    dim: int, sigma: float, alpha: float, std: float, length: int, hidden: int, seed: int
) -> ProjectionSpec:
    """A ~ N(0, (alpha * std / (sqrt(d) * sigma))^2), [d, P*hidden]: each prompt element then has std
    ~ alpha * std when z ~ N(0, sigma^2 I). Drawn by the protocol's generator (the server's A is the same)."""
    scale = alpha * std / (np.sqrt(dim) * sigma)
    return ProjectionSpec(seed=seed, distribution="normal", scale=float(scale), dim=dim, shape=[length, hidden])


def placeholder_tokens(init: str, offset: int, length: int, vocab_size: int) -> list[int] | None:
    """P placeholder ids under the prompt (BBT: vocabulary ids 1000..1000+P-1), or None for a pure soft prompt."""
    if init == "none":
        return None
    if init == "instruction":  # only BBT builds its prompt from the task in setup()
        raise ValueError("init_tokens=instruction is supported by bbt only")
    return [(offset + i) % vocab_size for i in range(length)]
