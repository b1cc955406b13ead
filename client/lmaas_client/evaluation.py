"""Scoring prompts on a task through the API: template, verbalizer, chunking to the server's limits."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lmaas_client import calibration as calibrating
from lmaas_client.calibration import Calibration
from lmaas_client.client import LMaaSClient
from lmaas_client.errors import NotFoundError
from lmaas_client.prompts import PromptCandidate, named_specs, projection_names
from lmaas_client.tasks import Placement, TaskError, TaskSpec
from lmaas_protocol import EvaluateRequest, EvaluateResponse, Example, InputsSpec, scoring

NO_PROMPT = PromptCandidate()  # empty {prompt} slot: the manual-prompt (zero-shot) baseline


@dataclass
class Scores:
    """One candidate on one set of examples."""

    logits: np.ndarray  # [examples, classes], as the server returned them
    loss: float  # of the calibrated logits when a calibration was fitted or given
    metric: float
    calibration: Calibration | None = None


class TaskScorer:
    """Evaluates candidate prompts on examples of one task; counts the calls the server charged.

    Example sets scored again and again (train, dev) can be registered once on the server (`cached=True`):
    requests then carry a handle instead of the texts, and the server reuses their tokenization and, for
    causal LMs with the prompt after the text, the text's keys/values. An evicted handle is registered again.
    """

    def __init__(self, client: LMaaSClient, task: TaskSpec, placement: Placement = "prefix", truncate: bool = True):
        self.client = client
        self.task = task
        self.info = client.model_info()
        self.template = task.template(self.info.family, placement)
        self.verbalizer = build_verbalizer(client, task.label_words[self.info.family])
        self.truncate = truncate
        self.calls = 0
        self._handles: dict[tuple[int, int], str] = {}  # (id of the example list, chunk start) -> handle

    def calls_per_candidate(self, num_examples: int) -> int:
        """Calls one candidate costs on `num_examples` examples: one per request-sized chunk."""
        return -(-num_examples // self.info.limits.max_examples)

    def logits(
        self,
        examples: Sequence[Example],
        candidates: Sequence[PromptCandidate],
        cached: bool = False,
        key: str | None = None,
    ) -> list[np.ndarray]:
        """[examples, classes] logits per candidate, in as few requests as the server's limits allow.

        `key`: an idempotency key for this evaluation, derived by the caller from where it stands (a run's id
        and step); each request gets `key` plus its chunk, so the same evaluation sent again (a resumed run)
        is replayed by the server instead of charged twice. None: a random key per request (retries only)."""
        limits = self.info.limits
        out: list[list[np.ndarray]] = [[] for _ in candidates]
        for e0 in range(0, len(examples), limits.max_examples):
            chunk = list(examples[e0 : e0 + limits.max_examples])
            for c0 in range(0, len(candidates), limits.max_candidates):
                group = candidates[c0 : c0 + limits.max_candidates]
                names = projection_names(group)
                specs = named_specs(group, names) or None
                wire = [c.to_wire(names) for c in group]
                request_key = None if key is None else f"{key}-e{e0}-c{c0}"
                if cached:
                    response = self._evaluate_cached((id(examples), e0), chunk, wire, specs, request_key)
                else:
                    inline = self.inputs_spec(chunk).model_dump()
                    request = EvaluateRequest(**inline, candidates=wire, projections=specs)
                    response = self.client.evaluate(request, idempotency_key=request_key)
                self.calls += response.usage.calls
                for offset, result in enumerate(response.results):
                    out[c0 + offset].append(np.array(result.logits.to_numpy(), dtype=np.float32))
        return [np.concatenate(parts, axis=0) for parts in out]

    def inputs_spec(self, examples: list[Example]) -> InputsSpec:
        return InputsSpec(template=self.template, examples=examples, verbalizer=self.verbalizer, truncate=self.truncate)

    def _evaluate_cached(self, key, examples: list[Example], wire, projections, request_key=None) -> EvaluateResponse:
        for attempt in range(2):
            if key not in self._handles:
                self._handles[key] = self.client.register_inputs(self.inputs_spec(examples)).handle
            request = EvaluateRequest(inputs=self._handles[key], candidates=wire, projections=projections)
            retry_key = None if request_key is None else request_key + ("-again" if attempt else "")
            try:
                return self.client.evaluate(request, idempotency_key=retry_key)
            except NotFoundError:  # evicted (410) or forgotten (404) by the server: register again, once
                del self._handles[key]
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def score(
        self,
        examples: Sequence[Example],
        candidates: Sequence[PromptCandidate],
        loss: str = "ce",
        cached: bool = False,
        calibrate: bool = False,
        calibration: Calibration | None = None,
        key: str | None = None,
    ) -> list[Scores]:
        """Loss and metric per candidate; `calibrate` fits each candidate's own class bias on these examples
        (zero calls: the logits are already here) and scores the corrected logits, `calibration` applies a
        given one (a prompt's, fitted on the training set, to dev or test)."""
        labels = np.array([e.label for e in examples])
        scores = []
        for logits in self.logits(examples, candidates, cached, key):
            fitted = calibrating.fit(logits, labels) if calibrate else calibration
            used = fitted.apply(logits) if fitted is not None else logits
            scores.append(Scores(logits, scoring.loss(loss, used, labels, self.task.metric),
                                 scoring.score(self.task.metric, used, labels), fitted))  # fmt: skip
        return scores


def build_verbalizer(client: LMaaSClient, words: Sequence[str]) -> list[list[int]]:
    """Token ids per class: the first sub-token of each label word (as BBT and LM-BFF do)."""
    ids = client.tokenize(list(words)).ids
    for word, tokens in zip(words, ids, strict=True):
        if not tokens:
            raise TaskError(f"label word {word!r} tokenizes to nothing")
    first = [[tokens[0]] for tokens in ids]
    if len({f[0] for f in first}) != len(first):
        raise TaskError(f"label words {list(words)} share their first token; choose distinct words")
    return first
