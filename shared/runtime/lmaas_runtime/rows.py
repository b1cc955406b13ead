"""What one forward pass is made of: rows (one prompt on one rendered example), their prompts and verbalizers.

Rows from different requests (and different templates or verbalizers) may share a batch; `batches` packs
them by token cost. A row's prompt is already on the model's device (`RowPrompt`); the server decodes wire
candidates into it, the client builds it from the tensors it trains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from lmaas_runtime.prefix import PrefixKV
from lmaas_runtime.rendering import RenderedExample

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class RowPrompt:
    """One prompt as the forward pass needs it. Tensors are [P, hidden] on the model's device."""

    length: int  # P
    token_ids: list[int] | None = None  # discrete tokens at the prompt positions, or None (zero base)
    soft: torch.Tensor | None = None  # added at the word-embedding level (soft_prompt + deep_prompt[0])
    deep: dict[int, torch.Tensor] = field(default_factory=dict)  # layer i >= 1 -> added to its input
    offset: torch.Tensor | None = None  # [s, hidden], added to the example's own token embeddings (DePT)

    @property
    def touches_text(self) -> bool:
        """True when the example's tokens change (so their cached keys/values cannot be reused)."""
        return self.offset is not None

    @property
    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.soft, self.offset, *self.deep.values()) if t is not None]

    def finite(self) -> bool:
        """False when projecting or multiplying finite inputs overflowed (one device sync; a population: use
        `first_overflow`)."""
        return first_overflow([self]) is None


def first_overflow(prompts: Sequence[RowPrompt]) -> int | None:
    """Index of the first prompt with an Inf or NaN (projecting or multiplying finite inputs overflowed, e.g. a
    huge z or scale), else None: one check per prompt on its device and one transfer for all of them."""
    import torch

    checked, flags = [], []
    for i, prompt in enumerate(prompts):
        if prompt.tensors:
            checked.append(i)
            flags.append(torch.stack([torch.isfinite(t).all() for t in prompt.tensors]).all())
    if not flags:
        return None
    finite = torch.stack(flags).cpu().tolist()  # prompts share the model's device
    return next((i for i, ok in zip(checked, finite, strict=True) if not ok), None)


@dataclass(eq=False)
class Verbalizer:
    """Token ids per class as a padded index [C, W] plus a validity mask (built once per request)."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, ids: Sequence[Sequence[int]], device: torch.device) -> Verbalizer:
        import torch

        width = max(len(row) for row in ids)
        index = torch.tensor([list(row) + [row[0]] * (width - len(row)) for row in ids], device=device)
        valid = torch.tensor([[j < len(row) for j in range(width)] for row in ids], device=device)
        return cls(index, valid)

    def __call__(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B, C]: a class's logit is the logsumexp of its label words' logits."""
        return self.reduce(vocab_logits[:, self.index.to(vocab_logits.device)])  # the head's device

    def reduce(self, word_logits: torch.Tensor) -> torch.Tensor:
        """[B, C, W] logits of `index`'s words -> [B, C] (the logsumexp over each class's words)."""
        import torch

        valid = self.valid.to(word_logits.device)  # the head's device (device_map)
        return torch.logsumexp(word_logits.masked_fill(~valid, float("-inf")), dim=-1)


@dataclass(eq=False)
class Row:
    example: RenderedExample
    prompt: RowPrompt
    verbalizer: Verbalizer | None = None  # None: the caller reads the vocabulary logits itself
    out: np.ndarray | None = None  # the request's [classes] slot for this (candidate, example), for `run`
    prefix: PrefixKV | None = None  # set for the prefix-cache path
    prefix_row: int = 0  # this example's index in `prefix`

    @property
    def suffix_ids(self) -> list[int]:
        """Tokens this row runs: all of them (plain) or those from the prompt slot on (prefix cache)."""
        return with_prompt_tokens(self.example, self.prompt)[self.example.prompt_at :] if self.prefix else []

    @property
    def cost(self) -> int:
        """Tokens the row computes: all of them (plain) or those from the prompt slot on (prefix cache)."""
        if self.prefix is None:
            return self.example.length(self.prompt.length)
        return self.example.length(self.prompt.length) - self.example.prompt_at

    @property
    def context(self) -> int:
        """Cached positions the row attends over without computing them (its prefix's padded width)."""
        return 0 if self.prefix is None else self.prefix.width


def batches(rows: Sequence[Row], max_batch_tokens: int, context_weight: float = 0.5) -> Iterator[list[Row]]:
    """Rows of one path, sorted by cost and cut so that rows x (most computed tokens + `context_weight` x
    widest cached context) <= max_batch_tokens (less padding).

    Batches are sized by the tokens they compute; a cached position costs only the memory of its gathered
    keys/values, `context_weight` of a computed token's (`memory.context_weight` from the model config).
    """
    for cached in (False, True):
        ordered = sorted((r for r in rows if (r.prefix is not None) == cached), key=lambda r: (r.cost, r.context))
        batch: list[Row] = []
        cost = context = 0
        for row in ordered:
            cost, context = max(cost, row.cost), max(context, row.context)
            if batch and (len(batch) + 1) * (cost + context_weight * context) > max_batch_tokens:
                yield batch
                batch, cost, context = [], row.cost, row.context
            batch.append(row)
        if batch:
            yield batch


def with_prompt_tokens(example: RenderedExample, prompt: RowPrompt) -> list[int]:
    if example.prompt_at < 0 or prompt.length == 0:
        return example.ids
    # Pure soft prompts get placeholder id 0; their embeddings are zeroed before the soft prompt is added.
    inserted = prompt.token_ids if prompt.token_ids is not None else [0] * prompt.length
    return example.ids[: example.prompt_at] + list(inserted) + example.ids[example.prompt_at :]
