"""Forward passes that score candidate prompts: rows = candidates x examples, packed into token-bounded
batches, prompt vectors written into the input embeddings, and only the label-word logits kept.

Nothing here ever returns hidden states or full-vocabulary logits: a pre-hook on the output embedding
(the LM head's final linear layer) keeps just the label position of each row, so the head computes
[rows, vocab] instead of [rows, seq, vocab] (for SmolLM2: 49,152 x fewer wasted logits per token).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from lmaas_server.rendering import RenderedExample


@dataclass(frozen=True)
class PromptRows:
    """One candidate's prompt, as the forward pass needs it."""

    length: int  # P
    token_ids: list[int] | None  # [P] discrete tokens, or None (zero base)
    soft: torch.Tensor | None  # [P, hidden] added to the base embeddings, or None


@dataclass(frozen=True)
class Row:
    candidate: int
    example: int
    length: int  # tokens once the prompt is inserted


class LabelPositionHook:
    """Forward pre-hook on the output embedding that keeps only each row's label position.

    Input hidden states [B, T, H] become [B, 1, H], so logits come out as [B, 1, V].
    """

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None  # [B] long

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        if self.positions is None:
            return args
        hidden = args[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, self.positions].unsqueeze(1), *args[1:])

    @contextmanager
    def keep(self, positions: torch.Tensor) -> Iterator[None]:
        self.positions = positions
        try:
            yield
        finally:
            self.positions = None


class PromptScorer:
    """Scores candidate prompts over rendered examples with one frozen model."""

    def __init__(self, model: torch.nn.Module, causal: bool, pad_id: int, max_batch_tokens: int):
        self.model = model
        self.causal = causal
        self.pad_id = pad_id
        self.max_batch_tokens = max_batch_tokens
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype
        self.hook = LabelPositionHook()
        model.get_output_embeddings().register_forward_pre_hook(self.hook)

    @torch.inference_mode()
    def class_logits(
        self,
        examples: Sequence[RenderedExample],
        prompts: Sequence[PromptRows],
        verbalizer: Sequence[Sequence[int]],
    ) -> np.ndarray:
        """Label-word logits [candidates, examples, classes] (float32)."""
        rows = [
            Row(c, e, example.length(prompt.length))
            for c, prompt in enumerate(prompts)
            for e, example in enumerate(examples)
        ]
        out = np.empty((len(prompts), len(examples), len(verbalizer)), dtype=np.float32)
        for batch in self._batches(rows):
            logits = self._forward(batch, examples, prompts, verbalizer)  # [B, C]
            for row, values in zip(batch, logits, strict=True):
                out[row.candidate, row.example] = values
        return out

    def _batches(self, rows: list[Row]) -> Iterator[list[Row]]:
        """Rows sorted by length and cut so that rows x longest <= max_batch_tokens (less padding)."""
        ordered = sorted(rows, key=lambda r: r.length)
        batch: list[Row] = []
        for row in ordered:
            if batch and (len(batch) + 1) * row.length > self.max_batch_tokens:
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch

    def _forward(self, batch, examples, prompts, verbalizer) -> np.ndarray:
        width = max(row.length for row in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        label_at = torch.empty(len(batch), dtype=torch.long)
        for b, row in enumerate(batch):
            example, prompt = examples[row.example], prompts[row.candidate]
            tokens = _with_prompt_tokens(example, prompt, self.pad_id)
            ids[b, : len(tokens)] = torch.tensor(tokens)
            attention[b, : len(tokens)] = 1
            label_at[b] = example.label_position(prompt.length, self.causal)
        ids, attention, label_at = ids.to(self.device), attention.to(self.device), label_at.to(self.device)
        embeds = self.embedding(ids)  # [B, T, H]
        self._write_prompts(embeds, batch, examples, prompts)
        with self.hook.keep(label_at):
            output = self.model(inputs_embeds=embeds, attention_mask=attention, use_cache=False)
        logits = output.logits
        if logits.shape[1] == 1:  # [B, 1, V]: the hook kept one position per row
            vocab_logits = logits[:, 0]
        else:  # a head that bypasses its output-embedding module: gather here instead
            vocab_logits = logits[torch.arange(len(batch), device=logits.device), label_at]
        vocab_logits = vocab_logits.float()  # [B, V]
        return verbalizer_logits(vocab_logits, verbalizer).cpu().numpy()

    def _write_prompts(self, embeds: torch.Tensor, batch, examples, prompts) -> None:
        """Prompt positions hold embed(token_ids) + soft, or soft alone when there are no token ids."""
        for b, row in enumerate(batch):
            prompt, start = prompts[row.candidate], examples[row.example].prompt_at
            if prompt.length == 0 or start < 0:
                continue
            span = slice(start, start + prompt.length)
            if prompt.token_ids is None:
                embeds[b, span] = 0.0
            if prompt.soft is not None:
                embeds[b, span] += prompt.soft


def _with_prompt_tokens(example: RenderedExample, prompt: PromptRows, pad_id: int) -> list[int]:
    if example.prompt_at < 0 or prompt.length == 0:
        return example.ids
    # Placeholder ids for pure soft prompts; their embeddings are overwritten in _write_prompts.
    inserted = prompt.token_ids if prompt.token_ids is not None else [pad_id] * prompt.length
    return example.ids[: example.prompt_at] + list(inserted) + example.ids[example.prompt_at :]


def verbalizer_logits(vocab_logits: torch.Tensor, verbalizer: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, V] -> [B, C]: a class's logit is the logsumexp of its label words' logits."""
    width = max(len(ids) for ids in verbalizer)
    index = torch.tensor([list(ids) + [ids[0]] * (width - len(ids)) for ids in verbalizer])
    valid = torch.tensor([[j < len(ids) for j in range(width)] for ids in verbalizer])
    picked = vocab_logits[:, index.to(vocab_logits.device)]  # [B, C, W]
    picked = picked.masked_fill(~valid.to(vocab_logits.device), float("-inf"))
    return torch.logsumexp(picked, dim=-1)


def summarize(logits: np.ndarray, labels: np.ndarray | None) -> tuple[float | None, float | None]:
    """Mean cross-entropy over the classes and accuracy of one candidate's [examples, classes] logits."""
    if labels is None:
        return None, None
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    accuracy = float((logits.argmax(axis=1) == labels).mean())
    return loss, accuracy
