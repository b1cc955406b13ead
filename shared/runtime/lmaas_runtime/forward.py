"""Forward passes that score prompts: rows (one candidate on one example) packed into token-bounded batches.

Two paths:
- plain: the whole rendered example with the prompt inserted, prompt vectors written into the word
  embeddings, deep prompts added before each layer by pre-hooks;
- prefix cache (causal LMs, prompt after some text): the text before the {prompt} slot was run once
  (`prefix.PrefixKV`); a row then runs only its suffix (prompt + the rest of the template) on top of
  those keys/values. Deep prompts work here too: they touch only prompt positions, which the cached text
  never attends to. Embedding offsets change the text itself, so their rows take the plain path.

Rows from different requests (and different templates or verbalizers) may share a batch. No
full-vocabulary logits are computed: a pre-hook on the LM head keeps each row's hidden state at its label
position, and only the label words' logits are computed from it, in float32 (`head.LabelHead`).

The same code scores for the server (`run`: no gradients, class logits written into each row's slot) and
for the client's white-box methods (`label_states` and `class_logits` under the caller's grad mode:
gradients reach the soft prompt through the indexed writes into the word embeddings).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from lmaas_runtime.deep_reuse import LayerReuse
from lmaas_runtime.head import LabelHead
from lmaas_runtime.hooks import DeepPromptHooks
from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.placements import Placements, text_positions
from lmaas_runtime.prefix import gather_prefix
from lmaas_runtime.rows import Row, Verbalizer, with_prompt_tokens

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
        self.head = LabelHead(model)
        self.deep_hooks = DeepPromptHooks(layers)
        self.layer_reuse = LayerReuse(model, layers)  # deep prompts shared below a layer run it once (deep_reuse.py)

    @inference_mode
    def run(self, batch: Sequence[Row]) -> None:
        """Score every row of the batch and write its class logits (float32) into `row.out`."""
        hidden, logits = self.label_states(batch)
        groups: dict[int, list[int]] = {}
        for b, row in enumerate(batch):
            groups.setdefault(id(row.verbalizer), []).append(b)
        for members in groups.values():
            verbalizer = batch[members[0]].verbalizer
            picked = members if len(members) < len(batch) else slice(None)
            class_logits = self.class_logits(hidden, logits, verbalizer, picked).cpu().numpy()
            for b, values in zip(members, class_logits, strict=True):
                batch[b].out[:] = values

    def class_logits(self, hidden, logits, verbalizer: Verbalizer, rows=slice(None)) -> torch.Tensor:
        """Float32 class logits [b, C] of `rows` from `label_states`' output (differentiable in the hidden state)."""
        if hidden is not None:
            return verbalizer.reduce(self.head.logits(hidden[rows], verbalizer.index))  # [b, C, W] -> [b, C]
        return verbalizer(logits[rows].float())

    def label_states(self, batch: Sequence[Row]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """One forward pass (one path per batch) under the caller's grad mode: the hidden states [B, H] at the
        label positions (the LM head bypassed), or, for heads that cannot be, the head's logits [B, V]."""
        import torch

        cached = batch[0].prefix is not None
        starts = [0 if cached else row.example.prompt_at for row in batch]  # prompt position per row
        tokens = [row.suffix_ids if cached else with_prompt_tokens(row.example, row.prompt) for row in batch]
        ids, attention = self._pad(tokens)
        embeds = self._write_prompts(self.embedding(ids), batch, starts)  # [B, T, H]
        label_at = [row.example.label_position(row.prompt.length, self.causal) for row in batch]
        if cached:
            label_at = [at - row.example.prompt_at for at, row in zip(label_at, batch, strict=True)]
            kwargs = self._prefix_inputs(batch, attention)
        else:
            kwargs = {"attention_mask": attention}
        self.deep_hooks.additions = self._deep_additions(batch, starts)
        self.head.positions = torch.tensor(label_at, device=self.device)
        try:
            with self.layer_reuse.reusing(batch, embeds, kwargs, self.deep_hooks):
                logits = self.model(inputs_embeds=embeds, **kwargs).logits
            hidden = self.head.hidden if self.head.direct else None
        finally:
            self.head.reset()
            self.deep_hooks.additions = {}
        if hidden is not None:
            return hidden, None
        if logits.shape[1] != 1:  # a head that bypassed its output-embedding module: gather here
            logits = logits[
                torch.arange(len(batch), device=logits.device), torch.tensor(label_at, device=logits.device)
            ]
        return None, logits.reshape(len(batch), -1)

    @inference_mode
    def plain_embeds(self, batch: Sequence[Row]) -> tuple[torch.Tensor, list[int]]:
        """The plain path's input embeddings [B, T, H] (right-padded) and each row's real length: the very
        vectors `label_states` feeds the model, for a backend that runs the model elsewhere (vLLM)."""
        tokens = [with_prompt_tokens(row.example, row.prompt) for row in batch]
        ids, _ = self._pad(tokens)
        starts = [row.example.prompt_at for row in batch]
        return self._write_prompts(self.embedding(ids), batch, starts), [len(t) for t in tokens]

    def _pad(self, tokens: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids and attention mask [B, T], built on the host and sent in one transfer."""
        import torch

        lengths = np.fromiter(map(len, tokens), dtype=np.int64, count=len(tokens))
        real = np.arange(int(lengths.max()))[None, :] < lengths[:, None]  # [B, T]
        ids = np.full(real.shape, self.pad_id, dtype=np.int64)
        ids[real] = np.fromiter(itertools.chain.from_iterable(tokens), dtype=np.int64, count=int(lengths.sum()))
        both = torch.from_numpy(np.stack([ids, real.astype(np.int64)])).to(self.device)
        return both[0], both[1]

    def _write_prompts(self, embeds: torch.Tensor, batch: Sequence[Row], starts: list[int]) -> torch.Tensor:
        """Prompt positions: embed(token_ids) + soft, or soft alone; offsets on the example's own tokens.
        At most two indexed writes for the whole batch."""
        import torch

        zero_rows, zero_positions, added = [], [], Placements()
        for b, (row, start) in enumerate(zip(batch, starts, strict=True)):
            prompt = row.prompt
            if prompt.length and start >= 0:
                if prompt.token_ids is None:  # placeholder ids: their embeddings are replaced, not added to
                    zero_rows.append(np.full(prompt.length, b))
                    zero_positions.append(np.arange(start, start + prompt.length))
                if prompt.soft is not None:
                    added.span(b, start, prompt.soft)
            if prompt.offset is not None:
                text = text_positions(len(row.example.ids), row.example.prompt_at, prompt.length)
                added.add(b, text[: prompt.offset.shape[0]], prompt.offset)
        if zero_rows:
            index = torch.from_numpy(np.stack([np.concatenate(zero_rows), np.concatenate(zero_positions)]))
            rows, positions = index.to(embeds.device)
            embeds = embeds.index_put((rows, positions), embeds.new_zeros(()))
        if added:
            rows, positions, values = added.build(embeds.device)
            embeds = embeds.index_put((rows, positions), values.to(embeds.dtype), accumulate=True)
        return embeds

    def _deep_additions(self, batch: Sequence[Row], starts: list[int]) -> dict:
        """Per layer: (row indices [n], positions [n], values [n, H]) to add at the prompt positions."""
        placements: dict[int, Placements] = {}
        for b, (row, start) in enumerate(zip(batch, starts, strict=True)):
            for layer, values in row.prompt.deep.items():
                placements.setdefault(layer, Placements()).span(b, start, values)
        return {layer: p.build(self.device) for layer, p in placements.items()}

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
