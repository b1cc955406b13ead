"""Start-up checks of the engine: does the prefix cache reproduce the plain forward pass on this model? Does a
remote backend (vLLM) return this model's label logits?"""

from __future__ import annotations

import logging

import numpy as np
import torch

from lmaas_runtime import ModelError
from lmaas_runtime.precision import RELATIVE_TOLERANCE, dtype_name, relative_tolerance
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


def backend_matches(engine) -> None:
    """Score probe prompts through the backend and with the model in this process; raise `ModelError` (the
    server does not start) where they differ.

    Tolerance: bfloat16's (10% of the largest |logit|), as the backend may compute in a coarser dtype than this
    process. Enough to catch what would make every answer wrong: vLLM returning log-probabilities (started
    without `--logprobs-mode raw_logits`: every logit shifted by the log partition, tens of units) or other
    weights; the test suite checks equality to float32 rounding.
    """
    prepared = engine.prepare(probe_inputs(engine.causal), enforce_limits=False)
    variant = prepared.variant(engine.renderer, 3, 3)
    lm = engine.loaded
    generator = torch.Generator().manual_seed(0)
    prompts = [RowPrompt(3, token_ids=torch.randint(0, lm.vocab_size, (3,), generator=generator).tolist())]
    if getattr(engine.backend, "embeds", False):
        std = float(lm.embedding.weight.float().std())
        prompts.append(
            RowPrompt(3, soft=(torch.randn(3, lm.hidden_size, generator=generator) * std).to(lm.device, lm.dtype))
        )
    got = engine.score(prepared, variant, prompts, use_prefix=False)
    want = lm.prompt_logits(variant.rendered, prepared.spec.verbalizer, prompts)
    difference, tolerance, flipped = compare(
        got, want, max(relative_tolerance(lm.dtype), RELATIVE_TOLERANCE["bfloat16"])
    )
    if difference > tolerance or flipped:
        raise ModelError(f"the {engine.backend.name} backend's label logits differ from {lm.name}'s by {difference:.3g} "
                         f"(tolerance {tolerance:.3g}, {flipped} decisions differ): is vLLM serving the same weights, "
                         "started with --logprobs-mode raw_logits?")  # fmt: skip
    log.info("%s backend: label logits within %.3g of the model's (tolerance %.3g)", engine.backend.name,
             difference, tolerance)  # fmt: skip


def compare(got: np.ndarray, want: np.ndarray, relative: float) -> tuple[float, float, int]:
    """(max |got - want|, the tolerance: `relative` x max |want|, decisions [..., classes] that differ where
    `want`'s margin between its top two classes exceeds the tolerance)."""
    difference = float(np.abs(got - want).max())
    tolerance = relative * float(np.abs(want).max())
    top_two = np.sort(want, axis=-1)[..., -2:]
    clear = (top_two[..., 1] - top_two[..., 0]) > tolerance
    flipped = int(((got.argmax(-1) != want.argmax(-1)) & clear).sum())
    return difference, tolerance, flipped
