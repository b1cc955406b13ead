"""The engine: one frozen model behind the API's three operations (info, tokenize, evaluate).

Requests are checked against the server's limits and the model's vocabulary *before* any budget is
reserved or any forward pass runs, so bad input is never charged.
"""

from __future__ import annotations

import threading
import uuid

import numpy as np
import torch

from lmaas_protocol import (
    CandidateResult,
    EvaluateRequest,
    EvaluateResponse,
    FieldError,
    ModelInfo,
    ServerLimits,
    Tensor,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from lmaas_server.budget import CallBudget
from lmaas_server.config import Settings
from lmaas_server.errors import InvalidRequest
from lmaas_server.inference import PromptRows, PromptScorer, summarize
from lmaas_server.model_loading import LoadedModel
from lmaas_server.rendering import TemplateRenderer

EMBEDDING_STD_CHUNK = 8192  # vocabulary rows embedded at a time when measuring the embedding std


class Engine:
    def __init__(self, loaded: LoadedModel, settings: Settings):
        self.loaded = loaded
        self.settings = settings
        self.causal = loaded.family == "causal"
        tokenizer = loaded.tokenizer
        self.vocab_size = loaded.model.get_input_embeddings().weight.shape[0]
        self.max_length = min(settings.max_seq_len, _model_max_length(loaded))
        self.renderer = TemplateRenderer(tokenizer, self.causal, self.max_length)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scorer = PromptScorer(loaded.model, self.causal, pad_id or 0, settings.max_batch_tokens)
        self._forward_lock = threading.Lock()  # one forward at a time: bounded memory, full-core matmuls
        self.info = self._describe()

    # ------------------------------------------------------------------------------------------- info

    def _describe(self) -> ModelInfo:
        model, tokenizer, config = self.loaded.model, self.loaded.tokenizer, self.loaded.model.config
        return ModelInfo(
            name=self.loaded.name,
            family=self.loaded.family,
            architecture=type(model).__name__,
            model_type=config.model_type,
            num_layers=config.num_hidden_layers,
            hidden_size=model.get_input_embeddings().weight.shape[1],
            vocab_size=self.vocab_size,
            max_length=self.max_length,
            embedding_std=embedding_std(model.get_input_embeddings()),
            mask_token=tokenizer.mask_token if not self.causal else None,
            mask_token_id=tokenizer.mask_token_id if not self.causal else None,
            dtype=str(self.loaded.dtype).removeprefix("torch."),
            device=str(self.loaded.device),
            limits=ServerLimits(
                max_candidates=self.settings.max_candidates,
                max_examples=self.settings.max_examples,
                max_seq_len=self.max_length,
                max_prompt_length=self.settings.max_prompt_length,
                max_body_bytes=self.settings.max_body_bytes,
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

    # ------------------------------------------------------------------------------------------- evaluate

    def evaluate(self, request: EvaluateRequest, budget: CallBudget, request_id: str | None = None) -> EvaluateResponse:
        self._check_limits(request)
        lengths = [c.prompt_length for c in request.candidates]
        try:
            rendered = self.renderer.render(
                request.template, request.examples, max(lengths), request.truncate, min(lengths)
            )
        except FieldError as exc:
            raise InvalidRequest(exc.param, exc.reason) from None
        prompts = [self._prompt_rows(c) for c in request.candidates]
        calls = len(request.candidates)
        budget.reserve(calls)
        try:
            with self._forward_lock:
                logits = self.scorer.class_logits(rendered, prompts, request.verbalizer)  # [cand, N, C]
        except BaseException:
            budget.refund(calls)  # the caller gets an error and pays nothing
            raise
        labels = np.array([e.label for e in request.examples]) if request.has_labels else None
        results = []
        for candidate_logits in logits:
            loss, accuracy = summarize(candidate_logits, labels)
            results.append(CandidateResult(logits=Tensor.from_numpy(candidate_logits), loss=loss, accuracy=accuracy))
        tokens = sum(r.length(p.length) for p in prompts for r in rendered)
        usage = Usage(calls=calls, examples=len(rendered), tokens=tokens, budget_remaining=budget.remaining)
        return EvaluateResponse(
            request_id=request_id or uuid.uuid4().hex, model=self.loaded.name, results=results, usage=usage
        )

    def _check_limits(self, request: EvaluateRequest) -> None:
        s = self.settings
        if len(request.candidates) > s.max_candidates:
            raise InvalidRequest("candidates", f"at most {s.max_candidates} candidates per request")
        if len(request.examples) > s.max_examples:
            raise InvalidRequest("examples", f"at most {s.max_examples} examples per request")
        for c, ids in enumerate(request.verbalizer):
            self._check_ids(ids, f"verbalizer.{c}")
        hidden = self.info.hidden_size
        for i, candidate in enumerate(request.candidates):
            if candidate.prompt_length > s.max_prompt_length:
                raise InvalidRequest(
                    f"candidates.{i}", f"prompt of {candidate.prompt_length} tokens exceeds {s.max_prompt_length}"
                )
            if candidate.prompt_token_ids is not None:
                self._check_ids(candidate.prompt_token_ids, f"candidates.{i}.prompt_token_ids")
            if candidate.soft_prompt is not None and candidate.soft_prompt.shape[1] != hidden:
                raise InvalidRequest(
                    f"candidates.{i}.soft_prompt.shape",
                    f"needs {hidden} columns (the model's hidden size), got {candidate.soft_prompt.shape[1]}",
                )

    def _check_ids(self, ids: list[int], param: str) -> None:
        for j, token in enumerate(ids):
            if token >= self.vocab_size:
                raise InvalidRequest(
                    f"{param}.{j}", f"token id {token} is not below the vocabulary size {self.vocab_size}"
                )

    def _prompt_rows(self, candidate) -> PromptRows:
        soft = None
        if candidate.soft_prompt is not None:
            array = candidate.soft_prompt.to_numpy()  # [P, hidden], float16 or float32
            soft = torch.from_numpy(array.astype(np.float32)).to(self.loaded.device, self.loaded.dtype)
        return PromptRows(candidate.prompt_length, candidate.prompt_token_ids, soft)


def embedding_std(embedding: torch.nn.Module) -> float:
    """Std of the embedding layer's *outputs* over the vocabulary (includes any built-in scaling, e.g. Gemma)."""
    weight = embedding.weight
    total = total_sq = 0.0
    with torch.inference_mode():
        for start in range(0, weight.shape[0], EMBEDDING_STD_CHUNK):
            ids = torch.arange(start, min(start + EMBEDDING_STD_CHUNK, weight.shape[0]), device=weight.device)
            values = embedding(ids).double()
            total += values.sum().item()
            total_sq += (values * values).sum().item()
    count = weight.numel()
    mean = total / count
    return float(np.sqrt(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)))


def _model_max_length(loaded: LoadedModel) -> int:
    config = loaded.model.config
    positions = getattr(config, "max_position_embeddings", None)
    embeddings = getattr(loaded.model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(positions, int) and isinstance(padding_idx, int):
        positions -= padding_idx + 1  # RoBERTa-style position ids start after the padding index
    limits = [positions, getattr(loaded.tokenizer, "model_max_length", None)]
    finite = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(finite) if finite else 2048
