"""Start-up check of the engine: does the prefix cache reproduce the plain forward pass on this model?"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmaas_runtime.precision import dtype_name, relative_tolerance
from lmaas_runtime.probes import probe_inputs
from lmaas_runtime.rows import RowPrompt

log = logging.getLogger(__name__)


def prefix_cache_matches(engine) -> bool:
    """Score random prompts with and without the prefix cache; use the cache only if they agree.

    Agree: every class logit within the served dtype's rounding (`precision.RELATIVE_TOLERANCE` of the largest
    |logit|: 0.1% in float32, 10% in bfloat16, where batch shapes alone move SmolLM2's logits by 4%) and the
    same decision wherever the plain path's margin exceeds that. A cache that is wrong for a model (positions,
    masks) moves a real model's logits by more than their own size.
    """
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
    difference, tolerance, flipped = compare(cached, plain, relative_tolerance(lm.dtype))
    if difference > tolerance or flipped:
        log.warning("prefix cache differs from the plain path by %.3g (%s tolerance %.3g, %d decisions differ); "
                    "disabled", difference, dtype_name(lm.dtype), tolerance, flipped)  # fmt: skip
        return False
    log.info(
        "prefix cache on: within %.3g of the plain path (%s tolerance %.3g)",
        difference,
        dtype_name(lm.dtype),
        tolerance,
    )
    return True


def compare(got: np.ndarray, want: np.ndarray, relative: float) -> tuple[float, float, int]:
    """(max |got - want|, the tolerance: `relative` x max |want|, decisions [..., classes] that differ where
    `want`'s margin between its top two classes exceeds the tolerance)."""
    difference = float(np.abs(got - want).max())
    tolerance = relative * float(np.abs(want).max())
    top_two = np.sort(want, axis=-1)[..., -2:]
    clear = (top_two[..., 1] - top_two[..., 0]) > tolerance
    flipped = int(((got.argmax(-1) != want.argmax(-1)) & clear).sum())
    return difference, tolerance, flipped
