"""Request and response schemas of the `/v1` API.

Every model forbids unknown fields. The `Field(ge=, le=)` limits here are the protocol's absolute ceilings;
a server applies its own, usually tighter, limits from its settings and publishes them in `ModelInfo.limits`.
Validators raise `FieldError` so the server can report which parameter is wrong (`ErrorDetail.param`).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from lmaas_protocol.base import FieldError, WireModel
from lmaas_protocol.errors import ErrorCode
from lmaas_protocol.templates import parse_template, template_slots
from lmaas_protocol.tensors import FLOAT_DTYPES, Tensor

# Absolute ceilings of the protocol (servers publish their own limits, at most these).
MAX_CANDIDATES = 1024
MAX_EXAMPLES = 8192
MAX_CLASSES = 256
MAX_WORDS_PER_CLASS = 16
MAX_TEXT_CHARS = 32_768
MAX_PROMPT_TOKENS = 4096
MAX_TOKENIZE_TEXTS = 4096
MAX_TOKEN_ID = 2**31 - 1


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
    mask_token: str | None = None
    mask_token_id: int | None = None
    dtype: str
    device: str
    limits: ServerLimits


# ----------------------------------------------------------------------------------------------- tokenize


class TokenizeRequest(WireModel):
    texts: list[str] = Field(min_length=1, max_length=MAX_TOKENIZE_TEXTS)
    add_special_tokens: bool = False
    return_tokens: bool = Field(False, description="Also return the token strings.")

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


class Candidate(WireModel):
    """One prompt to score. Its rows fill the template's {prompt} slot.

    - `prompt_token_ids` (length P): discrete tokens at the prompt positions;
    - `soft_prompt` (P x hidden, float): vectors at the prompt positions. With token ids it is *added* to
      their embeddings (BBT's "add" mode); alone it replaces them (a pure soft prompt);
    - neither: the slot stays empty (the manual-prompt baseline).
    """

    soft_prompt: Tensor | None = None
    prompt_token_ids: list[int] | None = Field(None, max_length=MAX_PROMPT_TOKENS)

    @model_validator(mode="after")
    def _shapes(self) -> Candidate:
        if self.soft_prompt is not None:
            if self.soft_prompt.dtype not in FLOAT_DTYPES:
                raise FieldError("soft_prompt.dtype", f"must be a float dtype, got {self.soft_prompt.dtype}")
            if len(self.soft_prompt.shape) != 2:
                raise FieldError("soft_prompt.shape", f"must be [prompt_length, hidden], got {self.soft_prompt.shape}")
        if self.prompt_token_ids is not None:
            for j, token in enumerate(self.prompt_token_ids):
                if not 0 <= token <= MAX_TOKEN_ID:
                    raise FieldError(f"prompt_token_ids.{j}", f"token id {token} is out of range")
            if self.soft_prompt is not None and self.soft_prompt.shape[0] != len(self.prompt_token_ids):
                raise FieldError(
                    "soft_prompt.shape",
                    f"{self.soft_prompt.shape[0]} rows but {len(self.prompt_token_ids)} prompt_token_ids",
                )
        return self

    @property
    def prompt_length(self) -> int:
        if self.soft_prompt is not None:
            return self.soft_prompt.shape[0]
        return len(self.prompt_token_ids or ())


class EvaluateRequest(WireModel):
    template: str = Field(description="Text with slots {text_a}, {text_b}, {prompt}, {mask}.")
    examples: list[Example] = Field(min_length=1, max_length=MAX_EXAMPLES)
    verbalizer: list[list[int]] = Field(
        min_length=2,
        max_length=MAX_CLASSES,
        description="Token ids per class; a class's logit is the logsumexp of its tokens' logits.",
    )
    candidates: list[Candidate] = Field(min_length=1, max_length=MAX_CANDIDATES)
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
    def _consistency(self) -> EvaluateRequest:
        has_label = [e.label is not None for e in self.examples]
        if any(has_label) and not all(has_label):
            missing = has_label.index(False)
            raise FieldError(f"examples.{missing}.label", "either every example has a label or none has")
        for i, example in enumerate(self.examples):
            if example.label is not None and example.label >= len(self.verbalizer):
                raise FieldError(
                    f"examples.{i}.label",
                    f"{example.label} is not a class of the {len(self.verbalizer)}-class verbalizer",
                )
        slots = template_slots(self.template)
        if "text_b" in slots:
            for i, example in enumerate(self.examples):
                if example.text_b is None:
                    raise FieldError(f"examples.{i}.text_b", "the template uses {text_b} but the example has none")
        if "prompt" not in slots:
            for i, candidate in enumerate(self.candidates):
                if candidate.prompt_length:
                    raise FieldError(f"candidates.{i}", "the template has no {prompt} slot for this prompt")
        return self

    @property
    def has_labels(self) -> bool:
        return self.examples[0].label is not None


class CandidateResult(WireModel):
    logits: Tensor = Field(description="Label-word logits, [examples, classes] float32.")
    loss: float | None = Field(None, description="Mean cross-entropy over the classes (with labels).")
    accuracy: float | None = Field(None, description="Fraction of examples whose argmax is the label.")


class Usage(WireModel):
    calls: int = Field(ge=0, description="Calls charged: one per candidate evaluated over the examples.")
    examples: int = Field(ge=0)
    tokens: int = Field(ge=0, description="Tokens processed (rendered examples x candidates).")
    budget_remaining: int | None = None


class EvaluateResponse(WireModel):
    request_id: str
    model: str
    results: list[CandidateResult]
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
