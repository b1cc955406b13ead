"""Forward passes that score prompts: rows (one candidate on one example) packed into token-bounded batches.

Two paths:
- plain: the whole rendered example with the prompt inserted, prompt vectors written into the word
  embeddings, deep prompts added before each layer by pre-hooks;
- prefix cache (causal LMs, prompt after some text): the text before the {prompt} slot was run once
  (`prefix_cache.PrefixKV`); a row then runs only its suffix (prompt + the rest of the template) on top of
  those keys/values. Deep prompts work here too: they touch only prompt positions, which the cached text
  never attends to. Embedding offsets change the text itself, so their rows take the plain path.

Rows from different requests (and different templates or verbalizers) may share a batch. Nothing here
returns hidden states or full-vocabulary logits: a pre-hook on the LM head keeps each row's label position.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from lmaas_protocol.rendering import RenderedExample
from lmaas_server.prefix_cache import PrefixKV, gather_prefix
from lmaas_server.prompts import RowPrompt


@dataclass(eq=False)
class Verbalizer:
    """Token ids per class as a padded index [C, W] plus a validity mask (built once per request)."""

    index: torch.Tensor
    valid: torch.Tensor

    @classmethod
    def build(cls, ids: Sequence[Sequence[int]], device: torch.device) -> Verbalizer:
        width = max(len(row) for row in ids)
        index = torch.tensor([list(row) + [row[0]] * (width - len(row)) for row in ids], device=device)
        valid = torch.tensor([[j < len(row) for j in range(width)] for row in ids], device=device)
        return cls(index, valid)

    def __call__(self, vocab_logits: torch.Tensor) -> torch.Tensor:
        """[B, V] -> [B, C]: a class's logit is the logsumexp of its label words' logits."""
        picked = vocab_logits[:, self.index].masked_fill(~self.valid, float("-inf"))  # [B, C, W]
        return torch.logsumexp(picked, dim=-1)


@dataclass(eq=False)
class Row:
    example: RenderedExample
    prompt: RowPrompt
    verbalizer: Verbalizer
    out: np.ndarray  # the request's [classes] slot for this (candidate, example)
    prefix: PrefixKV | None = None  # set for the prefix-cache path
    prefix_row: int = 0  # this example's index in `prefix`

    @property
    def suffix_ids(self) -> list[int]:
        """Tokens this row runs: all of them (plain) or those from the prompt slot on (prefix cache)."""
        return _with_prompt_tokens(self.example, self.prompt)[self.example.prompt_at :] if self.prefix else []

    @property
    def cost(self) -> int:
        """Token slots the row occupies in a batch (prefix-cache rows also attend over the cached text)."""
        if self.prefix is None:
            return self.example.length(self.prompt.length)
        return self.example.length(self.prompt.length) - self.example.prompt_at + self.prefix.width


class LabelPositionHook:
    """Pre-hook on the output embedding: hidden [B, T, H] -> [B, 1, H] at each row's label position."""

    def __init__(self) -> None:
        self.positions: torch.Tensor | None = None

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        if self.positions is None:
            return args
        hidden = args[0]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, self.positions].unsqueeze(1), *args[1:])


class DeepPromptHooks:
    """Pre-hooks on every transformer layer that add deep prompts at the prompt positions (BBTv2)."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        self.additions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(layers):
            if index > 0:
                layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def add(module, args, kwargs):
            if index not in self.additions:
                return None
            rows, positions, values = self.additions[index]
            if args:
                hidden = args[0].index_put((rows, positions), values.to(args[0].dtype), accumulate=True)
                return (hidden, *args[1:]), kwargs
            hidden = kwargs["hidden_states"].index_put((rows, positions), values, accumulate=True)
            return args, {**kwargs, "hidden_states": hidden}

        return add


class Forward:
    """Runs batches of rows on one frozen model."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], causal: bool, pad_id: int):
        self.model = model
        self.causal = causal
        self.pad_id = pad_id
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self.label_hook = LabelPositionHook()
        model.get_output_embeddings().register_forward_pre_hook(self.label_hook)
        self.deep_hooks = DeepPromptHooks(layers)

    @torch.inference_mode()
    def run(self, batch: Sequence[Row]) -> None:
        """Score every row of the batch and write its class logits into `row.out`."""
        cached = batch[0].prefix is not None
        starts = [0 if cached else row.example.prompt_at for row in batch]  # prompt position per row
        tokens = [row.suffix_ids if cached else _with_prompt_tokens(row.example, row.prompt) for row in batch]
        ids, attention = self._pad(tokens)
        embeds = self.embedding(ids)  # [B, T, H]
        self._write_prompts(embeds, batch, starts)
        label_at = [row.example.label_position(row.prompt.length, self.causal) for row in batch]
        kwargs = {}
        if cached:
            label_at = [at - row.example.prompt_at for at, row in zip(label_at, batch, strict=True)]
            kwargs = self._prefix_inputs(batch, attention)
        else:
            kwargs = {"attention_mask": attention}
        self.deep_hooks.additions = self._deep_additions(batch, starts)
        self.label_hook.positions = torch.tensor(label_at, device=self.device)
        try:
            logits = self.model(inputs_embeds=embeds, **kwargs).logits
        finally:
            self.label_hook.positions = None
            self.deep_hooks.additions = {}
        if logits.shape[1] != 1:  # a head that bypassed its output-embedding module: gather here
            logits = logits[
                torch.arange(len(batch), device=logits.device), torch.tensor(label_at, device=logits.device)
            ]
        self._scatter(logits.reshape(len(batch), -1).float(), batch)

    def _pad(self, tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(tokens), width), dtype=torch.long)
        for b, row in enumerate(tokens):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[b, : len(row)] = 1
        return ids.to(self.device), attention.to(self.device)

    def _write_prompts(self, embeds: torch.Tensor, batch: Sequence[Row], starts: list[int]) -> None:
        """Prompt positions: embed(token_ids) + soft, or soft alone; offsets on the example's own tokens."""
        for b, (row, start) in enumerate(zip(batch, starts, strict=True)):
            prompt = row.prompt
            if prompt.length and start >= 0:
                span = slice(start, start + prompt.length)
                if prompt.token_ids is None:
                    embeds[b, span] = 0.0
                if prompt.soft is not None:
                    embeds[b, span] += prompt.soft
            if prompt.offset is not None:
                text = _text_positions(row.example, prompt.length)[: prompt.offset.shape[0]]
                embeds[b, text] += prompt.offset[: len(text)]

    def _deep_additions(self, batch: Sequence[Row], starts: list[int]) -> dict:
        """Per layer: (row indices, positions, values) to add at the prompt positions."""
        parts: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
        for b, (row, start) in enumerate(zip(batch, starts, strict=True)):
            for layer, values in row.prompt.deep.items():
                parts.setdefault(layer, []).append((b, start, values))
        additions = {}
        for layer, items in parts.items():
            rows = torch.cat([torch.full((v.shape[0],), b, dtype=torch.long) for b, _, v in items])
            positions = torch.cat([torch.arange(s, s + v.shape[0]) for _, s, v in items])
            additions[layer] = (rows.to(self.device), positions.to(self.device), torch.cat([v for *_, v in items]))
        return additions

    def _prefix_inputs(self, batch: Sequence[Row], suffix_attention: torch.Tensor) -> dict:
        """Cached keys/values of each row's text, and masks and positions that continue after it."""
        keys, values, prefix_attention, lengths = gather_prefix([(r.prefix, r.prefix_row) for r in batch], self.device)
        steps = torch.arange(suffix_attention.shape[1], device=self.device)
        cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)), config=self.model.config)
        return {
            "attention_mask": torch.cat([prefix_attention, suffix_attention], dim=1),
            "position_ids": lengths[:, None] + steps[None, :],
            "past_key_values": cache,
            "use_cache": True,
        }

    def _scatter(self, vocab_logits: torch.Tensor, batch: Sequence[Row]) -> None:
        groups: dict[int, list[int]] = {}
        for b, row in enumerate(batch):
            groups.setdefault(id(row.verbalizer), []).append(b)
        for members in groups.values():
            verbalizer = batch[members[0]].verbalizer
            class_logits = verbalizer(vocab_logits[members]).cpu().numpy()
            for b, values in zip(members, class_logits, strict=True):
                batch[b].out[:] = values


def batches(rows: Sequence[Row], max_batch_tokens: int) -> Iterator[list[Row]]:
    """Rows of one path, sorted by cost and cut so rows x costliest <= max_batch_tokens (less padding)."""
    for cached in (False, True):
        ordered = sorted((r for r in rows if (r.prefix is not None) == cached), key=lambda r: r.cost)
        batch: list[Row] = []
        for row in ordered:
            if batch and (len(batch) + 1) * row.cost > max_batch_tokens:
                yield batch
                batch = []
            batch.append(row)
        if batch:
            yield batch


def _with_prompt_tokens(example: RenderedExample, prompt: RowPrompt) -> list[int]:
    if example.prompt_at < 0 or prompt.length == 0:
        return example.ids
    # Pure soft prompts get placeholder id 0; their embeddings are zeroed before the soft prompt is added.
    inserted = prompt.token_ids if prompt.token_ids is not None else [0] * prompt.length
    return example.ids[: example.prompt_at] + list(inserted) + example.ids[example.prompt_at :]


def _text_positions(example: RenderedExample, prompt_length: int) -> torch.Tensor:
    """Positions of the example's own tokens (all but the prompt span) in the plain-path sequence."""
    positions = list(range(len(example.ids)))
    if example.prompt_at >= 0:
        positions = [p if p < example.prompt_at else p + prompt_length for p in positions]
    return torch.tensor(positions, dtype=torch.long)
