"""Request and response schemas of the `/v1` API.

Every model forbids unknown fields. The `Field(ge=, le=)` limits here are the protocol's absolute ceilings;
a server applies its own, usually tighter, limits from its settings and publishes them in `ModelInfo.limits`.
Validators raise `FieldError` so the server can report which parameter is wrong (`ErrorDetail.param`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, StrictBool, field_validator, model_validator

from lmaas_protocol.base import FieldError, WireModel
from lmaas_protocol.candidates import MAX_PROMPT_TOKENS, MAX_TOKEN_ID, Candidate, check_candidate
from lmaas_protocol.errors import ErrorCode
from lmaas_protocol.projection import MAX_PROJECTION_ELEMENTS, ProjectionSpec
from lmaas_protocol.templates import parse_template, template_slots
from lmaas_protocol.tensors import Tensor

# Absolute ceilings of the protocol (servers publish their own limits, at most these).
MAX_CANDIDATES = 1024
MAX_EXAMPLES = 8192
MAX_CLASSES = 256
MAX_WORDS_PER_CLASS = 16
MAX_TEXT_CHARS = 32_768
MAX_TOKENIZE_TEXTS = 4096
MAX_PROJECTIONS = 256


# ----------------------------------------------------------------------------------------------- health


class HealthResponse(WireModel):
    status: Literal["ok", "loading"]
    model_loaded: bool
    model: str | None = None
    version: str


class ServerLimits(WireModel):
    """The server's own limits; requests beyond them get a 4xx before any compute."""

    max_candidates: int = Field(ge=1, le=MAX_CANDIDATES)
    max_examples: int = Field(ge=1, le=MAX_EXAMPLES)
    max_seq_len: int = Field(ge=1, description="Tokens per rendered example, prompt included.")
    max_prompt_length: int = Field(ge=0, le=MAX_PROMPT_TOKENS)
    max_body_bytes: int = Field(ge=1)
    max_projection_elements: int = Field(
        1 << 28, ge=1, le=MAX_PROJECTION_ELEMENTS, description="Largest d * prod(shape) of a server-side projection."
    )
    max_classify_texts: int | None = Field(None, ge=1, le=MAX_EXAMPLES, description="Texts per POST /v1/classify.")
    max_classify_chars: int | None = Field(
        None, ge=1, le=MAX_TEXT_CHARS, description="Characters per text (text_a, text_b) of POST /v1/classify."
    )


class ModelInfo(WireModel):
    name: str
    family: Literal["masked", "causal"]
    architecture: str
    model_type: str
    num_layers: int = Field(ge=1)
    hidden_size: int = Field(ge=1)
    vocab_size: int = Field(ge=1)
    max_length: int = Field(ge=1, description="Longest rendered example the server accepts.")
    embedding_std: float = Field(
        gt=0, description="Std of the input word-embedding matrix; BBT scales its random projection by it."
    )
    layer_std: list[float] = Field(
        default_factory=list,
        description="Per layer i: std of the hidden states entering layer i (i = 0: the word embeddings), on a "
        "fixed probe set, outliers clipped (5 rounds at mean +- 3 std), as BBTv2 scales its projections. "
        "POST /v1/layer_std measures it on your own inputs.",
    )
    mask_token: str | None = None
    mask_token_id: int | None = None
    dtype: str = Field(description="The dtype the model is served in (float32, bfloat16, float16).")
    device: str
    limits: ServerLimits
    prefix_cache: bool = Field(
        False,
        description="Whether the text before {prompt} is computed once and reused (causal LMs; off when disabled "
        "or when the start-up check found it differs from the plain path). Absent from older servers: false.",
    )


# ----------------------------------------------------------------------------------------------- tokenize


class TokenizeRequest(WireModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_TOKENIZE_TEXTS)
    add_special_tokens: StrictBool = False
    return_tokens: StrictBool = Field(False, description="Also return the token strings.")

    @field_validator("texts")
    @classmethod
    def _text_lengths(cls, texts: list[str]) -> list[str]:
        for i, text in enumerate(texts):
            if len(text) > MAX_TEXT_CHARS:
                raise FieldError(f"texts.{i}", f"longer than {MAX_TEXT_CHARS} characters")
        return texts


class TokenizeResponse(WireModel):
    ids: list[list[int]]
    tokens: list[list[str]] | None = None


# ----------------------------------------------------------------------------------------------- evaluate


class Example(WireModel):
    text_a: str = Field(max_length=MAX_TEXT_CHARS)
    text_b: str | None = Field(None, max_length=MAX_TEXT_CHARS)
    label: int | None = Field(None, ge=0, lt=MAX_CLASSES)


class InputsSpec(WireModel):
    """A fixed example set with its template and verbalizer (inline in a request, or registered once)."""

    template: str = Field(description="Text with slots {text_a}, {text_b}, {prompt}, {mask}.")
    examples: list[Example] = Field(min_length=1, max_length=MAX_EXAMPLES)
    verbalizer: list[list[int]] = Field(
        min_length=2,
        max_length=MAX_CLASSES,
        description="Token ids per class; a class's logit is the logsumexp of its tokens' logits.",
    )
    truncate: bool = Field(
        False, description="Shorten the longest text of an over-long example instead of rejecting it."
    )

    @field_validator("template")
    @classmethod
    def _template(cls, template: str) -> str:
        try:
            parse_template(template)
        except ValueError as exc:
            raise FieldError("template", str(exc)) from None
        return template

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer(cls, verbalizer: list[list[int]]) -> list[list[int]]:
        for c, ids in enumerate(verbalizer):
            if not 1 <= len(ids) <= MAX_WORDS_PER_CLASS:
                raise FieldError(f"verbalizer.{c}", f"needs 1 to {MAX_WORDS_PER_CLASS} token ids, got {len(ids)}")
            for j, token in enumerate(ids):
                if not 0 <= token <= MAX_TOKEN_ID:
                    raise FieldError(f"verbalizer.{c}.{j}", f"token id {token} is out of range")
        return verbalizer

    @model_validator(mode="after")
    def _consistency(self) -> InputsSpec:
        check_examples(self.template, self.examples, len(self.verbalizer))
        return self

    @property
    def has_labels(self) -> bool:
        return self.examples[0].label is not None


def check_examples(template: str, examples: list[Example], num_classes: int) -> None:
    has_label = [e.label is not None for e in examples]
    if any(has_label) and not all(has_label):
        missing = has_label.index(False)
        raise FieldError(f"examples.{missing}.label", "either every example has a label or none has")
    for i, example in enumerate(examples):
        if example.label is not None and example.label >= num_classes:
            raise FieldError(
                f"examples.{i}.label", f"{example.label} is not a class of the {num_classes}-class verbalizer"
            )
    if "text_b" in template_slots(template):
        for i, example in enumerate(examples):
            if example.text_b is None:
                raise FieldError(f"examples.{i}.text_b", "the template uses {text_b} but the example has none")


class InputsResponse(WireModel):
    handle: str = Field(description="Reference it as `inputs` in evaluate requests instead of resending texts.")
    examples: int
    tokens: int = Field(description="Tokens of the rendered examples, without the prompt.")
    prefix_cache: bool = Field(
        description="Whether the text before the {prompt} slot is computed once and reused across candidates."
    )
    prefix_cache_reason: str = Field(description="Why (not): e.g. a prefix prompt has no text before it.")


class EvaluateRequest(WireModel):
    """Candidates scored on an example set: inline (template, examples, verbalizer) or a registered `inputs` handle."""

    inputs: str | None = Field(None, max_length=128, description="A handle from POST /v1/inputs.")
    template: str | None = Field(
        None, description="Inline inputs: text with slots {text_a}, {text_b}, {prompt}, {mask}."
    )
    examples: list[Example] | None = Field(None, min_length=1, max_length=MAX_EXAMPLES)
    verbalizer: list[list[int]] | None = Field(
        None, min_length=2, max_length=MAX_CLASSES, description="Inline inputs: token ids per class."
    )
    truncate: bool = Field(False, description="Inline inputs: shorten over-long examples instead of rejecting them.")
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
    projections: dict[str, ProjectionSpec] | None = Field(
        None, max_length=MAX_PROJECTIONS, description="Named projection specs that candidates refer to."
    )

    @field_validator("template")
    @classmethod
    def _template(cls, template: str | None) -> str | None:
        return None if template is None else InputsSpec._template(template)

    @field_validator("verbalizer")
    @classmethod
    def _verbalizer(cls, verbalizer: list[list[int]] | None) -> list[list[int]] | None:
        return None if verbalizer is None else InputsSpec._verbalizer(verbalizer)

    @model_validator(mode="after")
    def _consistency(self) -> EvaluateRequest:
        inline = [self.template is not None, self.examples is not None, self.verbalizer is not None]
        if self.inputs is not None and any(inline):
            raise FieldError("inputs", "give either an inputs handle or template/examples/verbalizer, not both")
        if self.inputs is not None and self.truncate:
            raise FieldError("truncate", "set truncate when registering the inputs (POST /v1/inputs)")
        if self.inputs is None:
            if not all(inline):
                missing = ["template", "examples", "verbalizer"][inline.index(False)]
                raise FieldError(missing, "required unless an inputs handle is given")
            check_examples(self.template, self.examples, len(self.verbalizer))
        for i, candidate in enumerate(self.candidates):
            if candidate.uses_named_projections:
                check_candidate(candidate, self.projections or {}, f"candidates.{i}.")
        if self.template is not None and "prompt" not in template_slots(self.template):
            for i, candidate in enumerate(self.candidates):
                if candidate.prompt_length(self.projections) or candidate.embedding_offset is not None:
                    raise FieldError(f"candidates.{i}", "the template has no {prompt} slot for this prompt")
        return self

    def inline_inputs(self) -> InputsSpec | None:
        if self.inputs is not None:
            return None
        return InputsSpec.model_construct(
            template=self.template, examples=self.examples, verbalizer=self.verbalizer, truncate=self.truncate
        )


class CandidateResult(WireModel):
    logits: Tensor = Field(description="Label-word logits, [examples, classes] float32.")
    loss: float | None = Field(None, description="Mean cross-entropy over the classes (with labels).")
    accuracy: float | None = Field(None, description="Fraction of examples whose argmax is the label.")


class Usage(WireModel):
    calls: int = Field(
        ge=0, description="Calls charged: evaluate, one per candidate over the examples; classify, one per text."
    )
    examples: int = Field(ge=0)
    tokens: int = Field(ge=0, description="Tokens processed (rendered examples x candidates).")
    budget_remaining: int | None = None


class EvaluateResponse(WireModel):
    request_id: str
    model: str
    results: list[CandidateResult]
    usage: Usage


class LayerStdRequest(WireModel):
    inputs: str = Field(max_length=128, description="A handle from POST /v1/inputs.")


class LayerStdResponse(WireModel):
    layer_std: list[float] = Field(description="Per layer, as ModelInfo.layer_std but on these inputs.")
    usage: Usage


# ----------------------------------------------------------------------------------------------- errors


class ErrorDetail(WireModel):
    code: ErrorCode
    message: str
    param: str | None = Field(None, description="Dotted path of the offending parameter, if any.")
    request_id: str | None = None
    details: dict[str, Any] | None = None


class ErrorResponse(WireModel):
    """The one error shape of every non-2xx response."""

    error: ErrorDetail
