"""The engine: one frozen model behind the API's operations (info, tokenize, inputs, evaluate, layer std).

Requests are checked against the server's limits and the model's vocabulary *before* any budget is
reserved or any forward pass runs, so bad input is never charged. Forward passes run on the scheduler's
worker thread, which batches concurrent requests together.
"""

from __future__ import annotations

import logging
import uuid

import numpy as np
import torch

from lmaas_protocol import (
    Candidate,
    CandidateResult,
    EvaluateRequest,
    EvaluateResponse,
    InputsResponse,
    InputsSpec,
    LayerStdRequest,
    LayerStdResponse,
    ModelInfo,
    Projected,
    ServerLimits,
    Tensor,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
    scoring,
)
from lmaas_protocol.candidates import shape_of, spec_of
from lmaas_protocol.templates import template_slots
from lmaas_runtime import FrozenLM, memory
from lmaas_runtime.prefix import compute_prefix, eligible
from lmaas_runtime.probes import probe_inputs
from lmaas_runtime.rendering import TemplateRenderer
from lmaas_runtime.rows import Row, RowPrompt, Verbalizer, first_overflow
from lmaas_server import metrics
from lmaas_server.config import Settings
from lmaas_server.engine.backends import build_backend
from lmaas_server.engine.bounds import check_bounds
from lmaas_server.engine.checks import backend_matches, prefix_cache_matches
from lmaas_server.engine.deadline import Deadline
from lmaas_server.engine.deployed import Classifier
from lmaas_server.engine.inputs_store import InputsStore, PreparedInputs, Variant
from lmaas_server.engine.prompts import CandidateDecoder
from lmaas_server.engine.scheduler import Job, Scheduler
from lmaas_server.errors import InvalidRequest
from lmaas_server.metering.accounts import Account

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, loaded: FrozenLM, settings: Settings):
        self.loaded = loaded
        self.settings = settings
        self.causal = loaded.family == "causal"
        self.vocab_size, self.hidden_size = loaded.vocab_size, loaded.hidden_size
        self.backend = build_backend(loaded, settings)  # what runs `run(rows)`: this process or a vLLM server
        self.max_length = min(settings.max_seq_len, loaded.max_length, self.backend.max_length or loaded.max_length)
        self.renderer = TemplateRenderer(loaded.tokenizer, self.causal, self.max_length)
        self.pad_id = loaded.pad_id
        self.dtype_max = float(torch.finfo(loaded.dtype).max)  # prompts must fit the model's dtype
        self.layers = loaded.layers
        self.forward = self.backend  # `run(rows)` scores one batch on the scheduler's thread
        self.decoder = CandidateDecoder(loaded.device, loaded.dtype, settings.projection_cache_bytes)
        self.inputs = InputsStore(settings.max_input_handles, settings.input_cache_bytes)
        # unset: 16,384 on a CPU, on CUDA what the memory left free after loading allows
        self.max_batch_tokens = settings.max_batch_tokens or memory.default_batch_tokens(loaded.model)
        weight = memory.context_weight(loaded.model.config, loaded.dtype.itemsize)
        self.scheduler = Scheduler(self.forward, self.backend.round_tokens or self.max_batch_tokens, weight)
        log.info("forward passes of at most %d tokens", self.max_batch_tokens)
        self.prefix_cache = (
            self.causal and settings.prefix_cache and self.backend.prefix_cache and prefix_cache_matches(self)
        )
        if self.backend.name != "transformers":
            backend_matches(self)  # refuses to serve a backend whose label logits are not this model's
        self.info = self._describe()
        self.classifier = Classifier(self)  # POST /v1/classify with deployed prompts (deployed.py)

    def close(self) -> None:
        self.scheduler.close()
        self.backend.close()

    def _describe(self) -> ModelInfo:
        model, tokenizer, config = self.loaded.model, self.loaded.tokenizer, self.loaded.model.config
        embedding_std = self.loaded.embedding_std
        return ModelInfo(
            name=self.loaded.name,
            family=self.loaded.family,
            architecture=type(model).__name__,
            model_type=config.model_type,
            num_layers=len(self.layers),
            hidden_size=self.hidden_size,
            vocab_size=self.vocab_size,
            max_length=self.max_length,
            embedding_std=embedding_std,
            layer_std=[
                embedding_std,
                *self.layer_std(self.prepare(probe_inputs(self.causal), enforce_limits=False))[1:],
            ],
            mask_token=tokenizer.mask_token if not self.causal else None,
            mask_token_id=tokenizer.mask_token_id if not self.causal else None,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            device=str(self.loaded.device),
            prefix_cache=bool(self.prefix_cache),
            limits=ServerLimits(
                max_candidates=self.settings.max_candidates,
                max_examples=self.settings.max_examples,
                max_seq_len=self.max_length,
                max_prompt_length=self.settings.max_prompt_length,
                max_body_bytes=self.settings.max_body_bytes,
                max_projection_elements=self.settings.max_projection_elements,
                max_classify_texts=self.settings.max_classify_texts,
                max_classify_chars=self.settings.max_classify_chars,
            ),
        )

    # ------------------------------------------------------------------------------------------- tokenize

    def tokenize(self, request: TokenizeRequest) -> TokenizeResponse:
        if len(request.texts) > self.settings.max_examples:
            raise InvalidRequest("texts", f"at most {self.settings.max_examples} texts per request")
        encoded = self.loaded.tokenizer(request.texts, add_special_tokens=request.add_special_tokens)
        ids = [list(map(int, row)) for row in encoded["input_ids"]]
        tokens = [self.loaded.tokenizer.convert_ids_to_tokens(row) for row in ids] if request.return_tokens else None
        return TokenizeResponse(ids=ids, tokens=tokens)

    # ------------------------------------------------------------------------------------------- inputs

    def prepare(self, spec: InputsSpec, enforce_limits: bool = True, render: bool = True) -> PreparedInputs:
        """Check an example set against the limits and vocabulary (and render it without a prompt)."""
        if enforce_limits and len(spec.examples) > self.settings.max_examples:
            raise InvalidRequest("examples", f"at most {self.settings.max_examples} examples per request")
        for c, ids in enumerate(spec.verbalizer):
            self._check_ids(ids, f"verbalizer.{c}")
        self.backend.check_verbalizer(spec.verbalizer, "verbalizer")
        labels = np.array([e.label for e in spec.examples]) if spec.has_labels else None
        prepared = PreparedInputs(spec, Verbalizer.build(spec.verbalizer, self.loaded.device), labels)
        if render:  # registered sets must be scoreable as they are (the manual prompt)
            prepared.variant(self.renderer, 0, 0)
        return prepared

    def register_inputs(self, spec: InputsSpec, owner: str | None = None) -> InputsResponse:
        prepared = self.prepare(spec)
        prepared.owner = owner
        handle = self.inputs.add(prepared)
        rendered = prepared.variant(self.renderer, 0, 0).rendered
        cacheable, reason = self._prefix_reason(rendered)
        return InputsResponse(
            handle=handle,
            examples=len(rendered),
            tokens=sum(len(e.ids) for e in rendered),
            prefix_cache=cacheable,
            prefix_cache_reason=reason,
        )

    def _prefix_reason(self, rendered) -> tuple[bool, str]:
        if not self.causal:
            return False, "masked LMs attend in both directions: every token depends on the prompt"
        if not self.backend.prefix_cache:
            return False, f"the {self.backend.name} backend caches the text of token-id prompts itself"
        if not self.prefix_cache:
            return False, "disabled on this server or unsupported by this model"
        if not eligible(rendered):
            return False, "the prompt comes first (prefix placement): no text before it to reuse"
        if not self._prefix_fits(rendered):
            return False, (f"the keys/values of this text would take {self._prefix_bytes(rendered) / 2**20:.0f} MiB, "
                           f"more than the server's input cache ({self.settings.input_cache_bytes / 2**20:.0f} MiB)")  # fmt: skip
        return True, "the text before {prompt} is computed once; deep prompts reuse it too, embedding offsets do not"

    # ------------------------------------------------------------------------------------------- evaluate

    def evaluate(
        self, request: EvaluateRequest, account: Account, request_id: str | None = None, owner: str | None = None
    ) -> EvaluateResponse:
        if request.inputs is not None:
            prepared = self.inputs.get(request.inputs, owner)
        else:  # rendered below, for the request's own prompt lengths
            prepared = self.prepare(request.inline_inputs(), render=False)
        self._check_candidates(request, prepared)
        lengths = [c.prompt_length(request.projections) for c in request.candidates]
        variant = prepared.variant(self.renderer, max(lengths), min(lengths))
        calls = len(request.candidates)
        tokens = sum(e.length(length) for length in lengths for e in variant.rendered)
        if tokens > self.settings.max_tokens_per_request:
            raise InvalidRequest(
                "candidates", f"{tokens} tokens (examples x candidates) exceed {self.settings.max_tokens_per_request}"
            )
        deadline = Deadline(self.settings.request_timeout_s)  # covers projections and forward passes
        with account.charge(calls, tokens) as charge, deadline.active():  # projections are paid work: after it
            prompts = [self.decoder.decode(c, request.projections) for c in request.candidates]
            charge.work_done()  # from here an error in the request is charged (see ChargeContext.work_done)
            overflow = first_overflow(prompts)  # one device sync for the whole population
            if overflow is not None:
                raise InvalidRequest(
                    f"candidates.{overflow}", "the prompt's values overflow to Inf or NaN once projected or multiplied"
                )
            use_prefix = self._use_prefix(variant, prompts, reused=request.inputs is not None)
            logits = self.score(prepared, variant, prompts, use_prefix, deadline)
            for i, candidate_logits in enumerate(logits):
                if not np.isfinite(candidate_logits).all():
                    raise InvalidRequest(f"candidates.{i}", "the prompt drives the model to Inf or NaN logits")
            results = [self._result(candidate_logits, prepared.labels) for candidate_logits in logits]
            usage = Usage(calls=calls, examples=len(variant.rendered), tokens=tokens, budget_remaining=charge.remaining)
            response = EvaluateResponse(
                request_id=request_id or uuid.uuid4().hex, model=self.loaded.name, results=results, usage=usage
            )
            charge.settle(response)
        return response

    def score(
        self,
        prepared: PreparedInputs,
        variant: Variant,
        prompts: list[RowPrompt],
        use_prefix: bool,
        deadline: Deadline | None = None,
    ) -> np.ndarray:
        """Class logits [candidates, examples, classes], computed on the scheduler's worker thread."""
        deadline = deadline or Deadline(self.settings.request_timeout_s)
        logits = np.empty((len(prompts), len(variant.rendered), len(prepared.spec.verbalizer)), dtype=np.float32)
        job = Job(lambda: self._rows(prepared, variant, prompts, logits, use_prefix))
        with deadline.watching(job):  # a SIGTERM wakes this wait and cancels the job's rows
            finished = self.scheduler.run(job, timeout=deadline.left())
        deadline.after_wait(finished)  # 503 when stopping, 504 when the time ran out
        return logits

    def layer_std(self, prepared: PreparedInputs) -> list[float]:
        """Per layer, the clipped std of the hidden states entering it, on these inputs (no prompt)."""
        rendered = prepared.variant(self.renderer, 0, 0).rendered
        return self.scheduler.call(lambda: self.loaded.layer_std(rendered, self.max_batch_tokens))

    def measure_layer_std(
        self, request: LayerStdRequest, account: Account, owner: str | None = None
    ) -> LayerStdResponse:
        """layer_std on registered inputs, charged as one call."""
        prepared = self.inputs.get(request.inputs, owner)
        tokens = sum(len(e.ids) for e in prepared.variant(self.renderer, 0, 0).rendered)
        with account.charge(1, tokens) as charge:
            values = self.layer_std(prepared)
            usage = Usage(
                calls=1, examples=len(prepared.spec.examples), tokens=tokens, budget_remaining=charge.remaining
            )
            response = LayerStdResponse(layer_std=values, usage=usage)
            charge.settle(response)
        return response

    def _use_prefix(self, variant: Variant, prompts: list[RowPrompt], reused: bool) -> bool:
        """Cached text pays off across requests (a handle) or across at least two candidates."""
        if not (self.prefix_cache and eligible(variant.rendered) and self._prefix_fits(variant.rendered)):
            return False
        cacheable = sum(not p.touches_text for p in prompts)
        return cacheable >= 2 or (reused and cacheable >= 1)

    def _prefix_bytes(self, rendered) -> int:
        """Bytes `compute_prefix` would keep for these examples, from the config: known before computing it."""
        width = max(e.prompt_at for e in rendered)
        return memory.prefix_bytes(self.loaded.model.config, self.loaded.dtype.itemsize, len(rendered), width)

    def _prefix_fits(self, rendered) -> bool:
        """A cache larger than the whole input cache is never computed (it would evict itself): plain path."""
        return self._prefix_bytes(rendered) <= self.settings.input_cache_bytes

    def _rows(self, prepared, variant: Variant, prompts, logits: np.ndarray, use_prefix: bool) -> list[Row]:
        """Runs on the scheduler thread (computing the text cache is forward work too)."""
        if use_prefix:
            metrics.cache_event("prefix", hit=variant.prefix is not None)
        if use_prefix and variant.prefix is None:
            variant.prefix = compute_prefix(self.loaded.model, variant.rendered, self.pad_id, self.max_batch_tokens)
            self.inputs.enforce_bounds()
        rows = []
        for c, prompt in enumerate(prompts):
            cached = use_prefix and not prompt.touches_text
            for e, example in enumerate(variant.rendered):
                # A row needs at least one token after the cached text (an empty prompt right before {mask}
                # has none): such rows take the plain path.
                prefix = variant.prefix if cached and example.length(prompt.length) > example.prompt_at else None
                rows.append(Row(example, prompt, prepared.verbalizer, logits[c, e], prefix, e))
        return rows

    @staticmethod
    def _result(logits: np.ndarray, labels: np.ndarray | None) -> CandidateResult:
        if labels is None:
            return CandidateResult(logits=Tensor.from_numpy(logits))
        loss, accuracy = scoring.loss("ce", logits, labels), scoring.accuracy(logits, labels)  # as the client's
        return CandidateResult(logits=Tensor.from_numpy(logits), loss=loss, accuracy=accuracy)

    # ------------------------------------------------------------------------------------------- checks

    def _check_candidates(self, request: EvaluateRequest, prepared: PreparedInputs) -> None:
        s = self.settings
        if len(request.candidates) > s.max_candidates:
            raise InvalidRequest("candidates", f"at most {s.max_candidates} candidates per request")
        has_slot = "prompt" in template_slots(prepared.spec.template)
        for i, candidate in enumerate(request.candidates):
            self._check_candidate(candidate, f"candidates.{i}", request.projections, has_slot)

    def _check_candidate(self, candidate: Candidate, param: str, projections, has_slot: bool) -> None:
        s = self.settings
        length = candidate.prompt_length(projections)
        if (length or candidate.embedding_offset is not None) and not has_slot:
            raise InvalidRequest(param, "the template has no {prompt} slot for this prompt")
        self.backend.check_candidate(candidate, param)  # forms the backend cannot serve: 422, never charged
        if length > s.max_prompt_length:
            raise InvalidRequest(param, f"prompt of {length} tokens exceeds {s.max_prompt_length}")
        if candidate.prompt_token_ids is not None:
            self._check_ids(candidate.prompt_token_ids, f"{param}.prompt_token_ids")
        for name, tensor in candidate.prompt_tensors():
            width = shape_of(tensor, projections)[1]
            if name != "embedding_offset.a" and width != self.hidden_size:
                raise InvalidRequest(
                    f"{param}.{name}.shape", f"needs {self.hidden_size} columns (the model's hidden size), got {width}"
                )
        if candidate.deep_prompt is not None and len(candidate.deep_prompt) > len(self.layers):
            raise InvalidRequest(
                f"{param}.deep_prompt", f"{len(candidate.deep_prompt)} entries, the model has {len(self.layers)} layers"
            )
        if candidate.embedding_offset is not None:
            rows = shape_of(candidate.embedding_offset.a, projections)[0]
            if rows > self.max_length:
                raise InvalidRequest(
                    f"{param}.embedding_offset.a.shape", f"{rows} rows exceed the {self.max_length} positions"
                )
        for name, tensor in candidate.prompt_tensors():
            if isinstance(tensor, Projected) and spec_of(tensor, projections).elements > s.max_projection_elements:
                raise InvalidRequest(
                    f"{param}.{name}.projection", f"d * prod(shape) exceeds {s.max_projection_elements}"
                )
        check_bounds(candidate, param, projections, self.dtype_max)  # overflow found before any work

    def _check_ids(self, ids: list[int], param: str) -> None:
        for j, token in enumerate(ids):
            if token >= self.vocab_size:
                raise InvalidRequest(
                    f"{param}.{j}", f"token id {token} is not below the vocabulary size {self.vocab_size}"
                )
