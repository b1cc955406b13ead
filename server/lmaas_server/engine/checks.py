"""Start-up check of the engine: does the prefix cache reproduce the plain forward pass on this model?"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmaas_runtime.probes import probe_inputs
from lmaas_runtime.rows import RowPrompt

log = logging.getLogger(__name__)

PREFIX_CACHE_TOLERANCE = 1e-3  # max |logit difference| between the cached and the plain path


def prefix_cache_matches(engine) -> bool:
    """Score random prompts with and without the prefix cache; use the cache only if they agree."""
    prepared = engine.prepare(probe_inputs(engine.causal), enforce_limits=False)
    variant = prepared.variant(engine.renderer, 3, 3)
    generator = torch.Generator().manual_seed(0)
    lm = engine.loaded
    std = float(lm.embedding.weight.float().std())
    prompts = [
        RowPrompt(3, soft=(torch.randn(3, lm.hidden_size, generator=generator) * std).to(lm.device, lm.dtype))
        for _ in range(2)
    ]
    try:
        cached = engine.score(prepared, variant, prompts, use_prefix=True)
        variant.prefix = None
        plain = engine.score(prepared, variant, prompts, use_prefix=False)
    except Exception:
        log.warning("prefix cache unsupported for this model; using the plain path", exc_info=True)
        return False
    difference = float(np.abs(cached - plain).max())
    if difference > PREFIX_CACHE_TOLERANCE * max(1.0, float(np.abs(plain).max())):
        log.warning("prefix cache differs from the plain path by %.2g; disabled", difference)
        return False
    return True
