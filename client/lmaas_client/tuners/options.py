"""Config fields that several tuners share, as mixins: one definition, one description, one validation.

A tuner's config class lists the mixins it needs, then `TunerConfig` last (pydantic orders fields from the
last base, so seed and loss stay first), then adds its own fields; it may override a shared field's default
(BBTv2's sigma and alpha are 0.2). Mixins are plain pydantic models; `extra="forbid"` comes from `TunerConfig`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class CMAOptions(BaseModel):
    """The CMA-ES search (BBT, BBTv2, DePT, GDFO)."""

    popsize: int = Field(20, ge=3, le=1024, description="CMA-ES population: candidates per generation (>= 3).")
    sigma: float = Field(1.0, gt=0, description="CMA-ES initial step size.")
    bound: float | None = Field(None, gt=0, description="Box bound on z (the paper: 5); None = unbounded.")
    covariance: Literal["full", "diagonal"] = Field(
        "full",
        description="full (the papers' CMA-ES) or diagonal (sep-CMA-ES: learns per-coordinate scales with "
        "learning rates ~dim times larger, so it adapts within the few generations a small budget allows).",
    )
    score_mean: bool = Field(
        False,
        description="Also score the CMA-ES mean each generation (one more call: popsize + 1 per generation). "
        "The mean averages the best half of the last population, so it is a less noise-fitted prompt than any "
        "one sample; it competes for the best-so-far prompt (and so for dev selection) but is not told to CMA-ES.",
    )


class ProjectedPromptOptions(BaseModel):
    """A prompt A z from a random projection, added to placeholder tokens and sent as z (BBT's form)."""

    prompt_length: int = Field(50, ge=1, le=4096, description="P prompt tokens.")
    alpha: float = Field(1.0, gt=0, description="Prompt element std, in units of the embedding std.")
    init_tokens: Literal["vocab", "none", "instruction"] = Field(
        "vocab",
        description="Tokens under the prompt: vocab (BBT's placeholder ids), none (a pure soft prompt) or "
        "instruction (the task's instruction text, so z = 0 is a sensible prompt; BBT only).",
    )
    instruction: str | None = Field(None, description="With init_tokens=instruction: the text [the task's].")
    init_token_offset: int = Field(1000, ge=0, description="First placeholder token id (BBT: 1000).")
    wire_dtype: Literal["float32", "float16"] = Field("float32", description="dtype of z / A z on the wire.")
