"""Deployed prompts on the engine: checked against the served model when uploaded, used by id to classify.

A prompt is checked at upload as thoroughly as an evaluate request's candidate is (widths against the
hidden size, token ids against the vocabulary, lengths, layers, overflow bounds, the template rendered with
the prompt), so a prompt that does not fit the model is a 422 naming its field then, never at classify time.
Classification renders the texts through the stored template, scores the one stored candidate on them (the
same forward pass as `/v1/evaluate`), applies the stored calibration and returns a label and the class
probabilities per text.

Charging: one call per text (and its rendered tokens against the token budget). Evaluate charges one call
per candidate per request, the BBT accounting of a tuning budget, where a request's examples are the fixed
training batch; classification work grows with the number of texts instead, so a provider charges per
item: the price of a text is then the same whether it is sent alone or in a batch of hundreds.
"""

from __future__ import annotations

import threading
import uuid
from collections import OrderedDict

import numpy as np

from lmaas_protocol import (
    Classification,
    ClassifyRequest,
    ClassifyResponse,
    Example,
    FieldError,
    InputsSpec,
    PromptInfo,
    PromptSpec,
    Usage,
)
from lmaas_protocol.templates import template_slots
from lmaas_server.engine.deadline import Deadline
from lmaas_server.errors import InvalidRequest
from lmaas_server.metering.accounts import Account
from lmaas_server.metering.prompt_store import PromptStore

PARSED_PROMPTS = 64  # parsed specs kept per server (an id's content never changes: ids derive from it)


def check(engine, spec: PromptSpec) -> None:
    """Everything the served model requires of the prompt; InvalidRequest names the field."""
    for c, ids in enumerate(spec.verbalizer):
        engine._check_ids(ids, f"verbalizer.{c}")
    has_slot = "prompt" in template_slots(spec.template)
    engine._check_candidate(spec.candidate, "candidate", spec.projections, has_slot)
    length = spec.prompt_length
    probe = Example(text_a="a probe text", text_b="a probe text")
    try:  # e.g. a causal LM needs {mask} at the end; the prompt must leave room for text
        engine.renderer.render(spec.template, [probe], length, True, length)
    except FieldError as exc:
        raise InvalidRequest("template", exc.reason) from None


def summary(spec: PromptSpec) -> dict:
    """What listings show of a prompt (stored beside it, so listing never parses tensors)."""
    return {"name": spec.name, "labels": spec.labels, "template": spec.template,
            "prompt_length": spec.prompt_length, "forms": spec.forms,
            "calibrated": spec.calibration is not None}  # fmt: skip


def deploy(engine, store: PromptStore, spec: PromptSpec, owner: int | None) -> PromptInfo:
    check(engine, spec)
    return store.add(owner, spec.model_dump_json().encode(), summary(spec), engine.info.name)


class Classifier:
    """`POST /v1/classify` on one engine, with a small cache of parsed prompts."""

    def __init__(self, engine):
        self.engine = engine
        self._parsed: OrderedDict[str, PromptSpec] = OrderedDict()
        self._lock = threading.Lock()

    def classify(
        self, store: PromptStore, request: ClassifyRequest, account: Account, owner: int | None, request_id: str
    ) -> ClassifyResponse:
        engine = self.engine
        self._check_texts(request)
        stored = store.get(owner, request.prompt)  # 404 for an unknown id or another key's
        spec = self._spec(stored.info, stored.spec)
        examples = [Example(text_a=t.text_a, text_b=t.text_b) for t in request.texts]
        if "text_b" in template_slots(spec.template):
            for i, text in enumerate(request.texts):
                if text.text_b is None:
                    raise InvalidRequest(f"texts.{i}.text_b", "this prompt's template needs text_b (a pair task)")
        inputs = InputsSpec.model_construct(template=spec.template, examples=examples, verbalizer=spec.verbalizer,
                                            truncate=spec.truncate)  # fmt: skip
        prepared = engine.prepare(inputs, enforce_limits=False, render=False)
        length = spec.prompt_length
        try:
            variant = prepared.variant(engine.renderer, length, length)
        except InvalidRequest as exc:  # the renderer names examples.i: here they are texts.i
            exc.param = (exc.param or "").replace("examples.", "texts.", 1) or None
            raise
        tokens = sum(e.length(length) for e in variant.rendered)
        if tokens > engine.settings.max_tokens_per_request:
            raise InvalidRequest("texts", f"{tokens} tokens exceed {engine.settings.max_tokens_per_request}")
        deadline = Deadline(engine.settings.request_timeout_s)
        with account.charge(len(examples), tokens) as charge, deadline.active():
            prompt = engine.decoder.decode(spec.candidate, spec.projections)
            charge.work_done()  # as in evaluate: an error found after the paid work is charged
            if not prompt.finite():
                raise InvalidRequest("prompt", "the prompt's values overflow to Inf or NaN once projected")
            logits = engine.score(prepared, variant, [prompt], False, deadline)[0]  # [texts, classes]
            if not np.isfinite(logits).all():
                raise InvalidRequest("prompt", "the prompt drives the model to Inf or NaN logits on these texts")
            usage = Usage(calls=len(examples), examples=len(examples), tokens=tokens, budget_remaining=charge.remaining)
            response = ClassifyResponse(request_id=request_id or uuid.uuid4().hex, model=engine.info.name,
                                        prompt=request.prompt, results=classifications(spec, logits),
                                        usage=usage)  # fmt: skip
            charge.settle(response)
        return response

    def _check_texts(self, request: ClassifyRequest) -> None:
        limits = self.engine.settings
        if len(request.texts) > limits.max_classify_texts:
            raise InvalidRequest("texts", f"at most {limits.max_classify_texts} texts per request")
        for i, text in enumerate(request.texts):
            for name in ("text_a", "text_b"):
                value = getattr(text, name)
                if value is not None and len(value) > limits.max_classify_chars:
                    raise InvalidRequest(f"texts.{i}.{name}", f"longer than {limits.max_classify_chars} characters")

    def _spec(self, info: PromptInfo, raw: bytes) -> PromptSpec:
        """The parsed prompt, checked again on this server's model (a replica may serve another one)."""
        if info.model != self.engine.info.name:
            raise InvalidRequest("prompt", f"deployed for {info.model}; this server serves {self.engine.info.name}")
        with self._lock:
            spec = self._parsed.get(info.id)
            if spec is not None:
                self._parsed.move_to_end(info.id)
                return spec
        spec = PromptSpec.model_validate_json(raw)
        try:
            check(self.engine, spec)
        except InvalidRequest as exc:
            raise InvalidRequest("prompt", f"no longer fits the served model ({exc.param}: {exc.message})") from None
        with self._lock:
            self._parsed[info.id] = spec
            while len(self._parsed) > PARSED_PROMPTS:
                self._parsed.popitem(last=False)
        return spec


def classifications(spec: PromptSpec, logits: np.ndarray) -> list[Classification]:
    """Per text: the label and the class probabilities of the (calibrated) logits [texts, classes]."""
    z = np.asarray(logits, dtype=np.float64)
    if spec.calibration is not None:
        z = z * spec.calibration.scale + np.asarray(spec.calibration.bias, dtype=np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    probabilities = z / z.sum(axis=1, keepdims=True)
    return [Classification(label=spec.labels[int(p.argmax())],
                           probabilities={name: float(v) for name, v in zip(spec.labels, p, strict=True)})
            for p in probabilities]  # fmt: skip
