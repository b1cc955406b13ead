"""Forward passes that score prompts: rows (one candidate on one example) packed into token-bounded batches.

Two paths:
- plain: the whole rendered example with the prompt inserted, prompt vectors written into the word
  embeddings, deep prompts added before each layer by pre-hooks;
- prefix cache (causal LMs, prompt after some text): the text before the {prompt} slot was run once
  (`prefix.PrefixKV`); a row then runs only its suffix (prompt + the rest of the template) on top of
  those keys/values. Deep prompts work here too: they touch only prompt positions, which the cached text
  never attends to. Embedding offsets change the text itself, so their rows take the plain path.

Rows from different requests (and different templates or verbalizers) may share a batch. Nothing here
returns hidden states or full-vocabulary logits: a pre-hook on the LM head keeps each row's label position.

The same code scores for the server (`run`: no gradients, class logits written into each row's slot) and
for the client's white-box methods (`vocab_logits` under the caller's grad mode: gradients reach the soft
prompt through the in-place writes into the word embeddings).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmaas_runtime.deep_reuse import LayerReuse
from lmaas_runtime.hooks import DeepPromptHooks, LabelPositionHook
from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.prefix import gather_prefix
from lmaas_runtime.rows import Row, text_positions, with_prompt_tokens

if TYPE_CHECKING:
    import torch


class Forward:
    """Runs batches of rows on one frozen model (hooks registered once, on construction)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module], causal: bool, pad_id: int):
        self.model = model
        self.causal = causal
        self.pad_id = pad_id
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self.label_hook = LabelPositionHook()
        head = model.get_output_embeddings()
        if head is not None:  # else the logits of every position come back and are gathered below
            head.register_forward_pre_hook(self.label_hook)
        self.deep_hooks = DeepPromptHooks(layers)
        self.layer_reuse = LayerReuse(model, layers)  # deep prompts shared below a layer run it once (deep_reuse.py)

    @inference_mode
    def run(self, batch: Sequence[Row]) -> None:
        """Score every row of the batch and write its class logits into `row.out`."""
        self._scatter(self.vocab_logits(batch).float(), batch)

    def vocab_logits(self, batch: Sequence[Row]) -> torch.Tensor:
        """Logits [B, V] at each row's label position, under the caller's grad mode (one path per batch)."""
        import torch

        cached = batch[0].prefix is not None
        starts = [0 if cached else row.example.prompt_at for row in batch]  # prompt position per row
        tokens = [row.suffix_ids if cached else with_prompt_tokens(row.example, row.prompt) for row in batch]
        ids, attention = self._pad(tokens)
        embeds = self.embedding(ids)  # [B, T, H]
        embeds = self._write_prompts(embeds, batch, starts)
        label_at = [row.example.label_position(row.prompt.length, self.causal) for row in batch]
        if cached:
            label_at = [at - row.example.prompt_at for at, row in zip(label_at, batch, strict=True)]
            kwargs = self._prefix_inputs(batch, attention)
        else:
            kwargs = {"attention_mask": attention}
        self.deep_hooks.additions = self._deep_additions(batch, starts)
        self.label_hook.positions = torch.tensor(label_at, device=self.device)
        try:
            with self.layer_reuse.reusing(batch, embeds, kwargs, self.deep_hooks):
                logits = self.model(inputs_embeds=embeds, **kwargs).logits
        finally:
            self.label_hook.positions = None
            self.deep_hooks.additions = {}
        if logits.shape[1] != 1:  # a head that bypassed its output-embedding module: gather here
            logits = logits[
                torch.arange(len(batch), device=logits.device), torch.tensor(label_at, device=logits.device)
            ]
        return logits.reshape(len(batch), -1)

    def _pad(self, tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        import torch

        width = max(len(t) for t in tokens)
        ids = torch.full((len(tokens), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(tokens), width), dtype=torch.long)
        for b, row in enumerate(tokens):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[b, : len(row)] = 1
        return ids.to(self.device), attention.to(self.device)

    def _write_prompts(self, embeds: torch.Tensor, batch: Sequence[Row], starts: list[int]) -> torch.Tensor:
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
                text = text_positions(row.example, prompt.length)[: prompt.offset.shape[0]]
                embeds[b, text] += prompt.offset[: len(text)]
        return embeds

    def _deep_additions(self, batch: Sequence[Row], starts: list[int]) -> dict:
        """Per layer: (row indices, positions, values) to add at the prompt positions."""
        import torch

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
        import torch
        from transformers import DynamicCache

        keys, values, prefix_attention, lengths = gather_prefix([(r.prefix, r.prefix_row) for r in batch], self.device)
        steps = torch.arange(suffix_attention.shape[1], device=self.device)
        cache = DynamicCache(ddp_cache_data=list(zip(keys, values, strict=True)), config=self.model.config)
        return {
            "attention_mask": torch.cat([prefix_attention, suffix_attention], dim=1),
            "position_ids": lengths[:, None] + steps[None, :],
            "cache": cache,
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
