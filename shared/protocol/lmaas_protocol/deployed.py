"""Deployed prompts: a tuned prompt stored on the server once (`POST /v1/prompts`) and then used by its id to
classify texts (`POST /v1/classify`), so any HTTP client can use it without the tuning details.

A stored prompt is everything classification needs: the candidate (any form `/v1/evaluate` accepts, raw or
server-side projected), the template it was tuned with, the verbalizer with a name per class, and
optionally the calibration fitted on the training set (z = logits * scale + bias, scale = 1 / temperature).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import Field, StrictBool, ValidationInfo, field_validator, model_validator

from lmaas_protocol.base import FieldError, WireModel
from lmaas_protocol.candidates import Candidate, check_candidate
from lmaas_protocol.projection import ProjectionSpec
from lmaas_protocol.schemas import MAX_CLASSES, MAX_EXAMPLES, MAX_PROJECTIONS, MAX_TEXT_CHARS, InputsSpec, Usage
from lmaas_protocol.templates import template_slots

MAX_CLASSIFY_TEXTS = MAX_EXAMPLES  # the protocol's ceiling; a server publishes its own (ModelInfo.limits)
MAX_NAME_CHARS = 200
MAX_LABEL_CHARS = 100
MAX_PROMPT_ID_CHARS = 64
MAX_BIAS = 1e4  # |bias| and scale beyond this are no calibration a fit produces

Bias = Annotated[float, Field(ge=-MAX_BIAS, le=MAX_BIAS, allow_inf_nan=False)]


class PromptCalibration(WireModel):
    """The affine correction applied to the label logits before the softmax: z = logits * scale + bias."""

    bias: list[Bias] = Field(min_length=2, max_length=MAX_CLASSES, description="Per class, added to its logit.")
    scale: float = Field(
        1.0, gt=0, le=MAX_BIAS, allow_inf_nan=False, description="1 / temperature; 1.0 when only the bias was fitted."
    )


class PromptSpec(WireModel):
    """A tuned prompt to deploy: the candidate, the template and verbalizer it was tuned with, a name per class."""

    name: str = Field("", max_length=MAX_NAME_CHARS, description="A label for you; not unique.")
    candidate: Candidate = Field(
        description="The prompt, in any form POST /v1/evaluate accepts ({} = the template alone)."
    )
    projections: dict[str, ProjectionSpec] | None = Field(
        None, max_length=MAX_PROJECTIONS, description="Named projection specs the candidate refers to."
    )
    template: str = Field(description="Text with slots {text_a}, {text_b}, {prompt}, {mask}.")
    verbalizer: list[list[int]] = Field(
        min_length=2,
        max_length=MAX_CLASSES,
        description="Token ids per class; a class's logit is the logsumexp of its tokens' logits.",
    )
    labels: list[str] = Field(min_length=2, max_length=MAX_CLASSES, description="A name per verbalizer class.")
    calibration: PromptCalibration | None = Field(None, description="Applied to every classification.")
    truncate: StrictBool = Field(True, description="Shorten over-long texts instead of rejecting them.")

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        return InputsSpec._template(template)

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer(cls, verbalizer: list[list[int]]) -> list[list[int]]:
        return InputsSpec._verbalizer(verbalizer)

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: list[str]) -> list[str]:
        for i, label in enumerate(labels):
            if not label.strip() or len(label) > MAX_LABEL_CHARS:
                raise FieldError(f"labels.{i}", f"needs 1 to {MAX_LABEL_CHARS} characters, not only spaces")
            if label in labels[:i]:
                raise FieldError(f"labels.{i}", f"{label!r} names two classes")
        return labels

    @model_validator(mode="after")
    def _consistency(self) -> PromptSpec:
        classes = len(self.verbalizer)
        if len(self.labels) != classes:
            raise FieldError("labels", f"{len(self.labels)} names for the verbalizer's {classes} classes")
        if self.calibration is not None and len(self.calibration.bias) != classes:
            raise FieldError("calibration.bias", f"{len(self.calibration.bias)} values for {classes} classes")
        if self.candidate.uses_named_projections:
            check_candidate(self.candidate, self.projections or {}, "candidate.")
        length = self.candidate.prompt_length(self.projections)
        if (length or self.candidate.embedding_offset is not None) and "prompt" not in template_slots(self.template):
            raise FieldError("template", "has no {prompt} slot for the candidate")
        return self

    @property
    def prompt_length(self) -> int:
        return self.candidate.prompt_length(self.projections)

    @property
    def forms(self) -> list[str]:
        """Which parts the candidate has: prompt_token_ids, soft_prompt, deep_prompt, embedding_offset."""
        parts = ("prompt_token_ids", "soft_prompt", "deep_prompt", "embedding_offset")
        return [part for part in parts if getattr(self.candidate, part) is not None]


class PromptInfo(WireModel):
    """A deployed prompt as the server describes it (its tensors stay on the server)."""

    id: str = Field(
        description="Use it as `prompt` in POST /v1/classify. The same prompt deployed again gets the same id."
    )
    name: str
    model: str = Field(description="The served model it was checked against at upload.")
    labels: list[str]
    template: str
    prompt_length: int = Field(ge=0)
    forms: list[str] = Field(description="The candidate's parts, e.g. ['soft_prompt'].")
    calibrated: bool
    created_at: datetime


class PromptList(WireModel):
    prompts: list[PromptInfo] = Field(description="Your key's deployed prompts, newest first.")


class ClassifyText(WireModel):
    text_a: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    text_b: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS, description="For pair tasks.")

    @field_validator("text_a", "text_b")
    @classmethod
    def _not_blank(cls, text: str | None, info: ValidationInfo) -> str | None:
        if text is not None and not text.strip():
            raise FieldError(info.field_name, "is empty (only white space)")
        return text


class ClassifyRequest(WireModel):
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_ID_CHARS, description="A deployed prompt's id.")
    texts: list[ClassifyText] = Field(min_length=1, max_length=MAX_CLASSIFY_TEXTS)


class Classification(WireModel):
    label: str = Field(description="The most probable class's name.")
    probabilities: dict[str, float] = Field(
        description="Per class name (calibrated when the prompt carries a calibration)."
    )


class ClassifyResponse(WireModel):
    request_id: str
    model: str
    prompt: str
    results: list[Classification] = Field(description="One per text, in order.")
    usage: Usage
