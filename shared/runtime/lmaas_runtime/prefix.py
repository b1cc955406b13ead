"""Keys/values of the text before the {prompt} slot, computed once and reused by every candidate.

For a causal LM and a template whose prompt comes after some text (e.g. ``Review: {text_a}\\n{prompt}...``),
that text does not depend on the candidate: its keys and values are computed once per example set and each
candidate then runs only its suffix (the prompt and the rest of the template), typically 5x fewer tokens.
A prompt at the very start (the papers' prefix placement) leaves nothing to reuse.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.rendering import RenderedExample

if TYPE_CHECKING:
    import torch


class PrefixKV:
    """Per layer keys and values [N, kv_heads, width, head_dim] of N right-padded prefixes."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], lengths: torch.Tensor):
        self.keys = keys
        self.values = values
        self.lengths = lengths  # [N] real prefix lengths
        self.width = keys[0].shape[2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


def eligible(examples: Sequence[RenderedExample]) -> bool:
    """Every example has text before its prompt slot."""
    return all(e.prompt_at > 0 for e in examples)


@inference_mode
def compute_prefix(
    model: torch.nn.Module, examples: Sequence[RenderedExample], pad_id: int, max_batch_tokens: int
) -> PrefixKV:
    """Run the base model (no LM head) over each example's tokens before its prompt slot."""
    import torch

    device = model.get_input_embeddings().weight.device
    prefixes = [e.ids[: e.prompt_at] for e in examples]
    width = max(len(p) for p in prefixes)
    rows_per_pass = max(1, max_batch_tokens // width)
    keys: list[list[torch.Tensor]] = []
    values: list[list[torch.Tensor]] = []
    for start in range(0, len(prefixes), rows_per_pass):
        chunk = prefixes[start : start + rows_per_pass]
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for b, prefix in enumerate(chunk):
            ids[b, : len(prefix)] = torch.tensor(prefix)
            attention[b, : len(prefix)] = 1
        output = model.base_model(input_ids=ids.to(device), attention_mask=attention.to(device), use_cache=True)
        layers = output.cache.layers
        if not keys:
            keys, values = [[] for _ in layers], [[] for _ in layers]
        for i, layer in enumerate(layers):
            keys[i].append(layer.keys)
            values[i].append(layer.values)
    lengths = torch.tensor([len(p) for p in prefixes], device=device)
    return PrefixKV([torch.cat(k) for k in keys], [torch.cat(v) for v in values], lengths)


def gather_prefix(
    rows: Sequence[tuple[PrefixKV, int]], device: torch.device
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """Stack the cached prefixes of a batch's rows (possibly from different example sets).

    Returns per-layer keys and values [B, kv_heads, width, head_dim], the prefix attention mask
    [B, width] (0 on padding) and the real lengths [B] (where each row's positions continue). The row
    indices go to the device once; then one gather per layer (per example set when several share the batch).
    """
    import torch

    groups: dict[int, tuple[PrefixKV, list[int], list[int]]] = {}  # id -> (prefix, batch rows, its rows)
    for b, (prefix, index) in enumerate(rows):
        group = groups.setdefault(id(prefix), (prefix, [], []))
        group[1].append(b)
        group[2].append(index)
    width = max(prefix.width for prefix, *_ in groups.values())
    indexed = []  # (prefix, batch rows [b], its rows [b]), both index tensors sent in one transfer
    for prefix, members, indices in groups.values():
        indexed.append((prefix, *torch.tensor([members, indices], dtype=torch.long).to(device)))
    layers = range(len(rows[0][0].keys))
    if len(indexed) == 1:  # one example set (the usual case): a gather per layer, already `width` wide
        prefix, _, index = indexed[0]
        # each layer's cache on its own device (device_map may spread layers over several); .to is free otherwise
        keys = [prefix.keys[layer].index_select(0, index.to(prefix.keys[layer].device)) for layer in layers]
        values = [prefix.values[layer].index_select(0, index.to(prefix.values[layer].device)) for layer in layers]
        lengths = prefix.lengths.index_select(0, index)
    else:
        keys = [_stack([(p.keys[layer], m, i) for p, m, i in indexed], len(rows), width) for layer in layers]
        values = [_stack([(p.values[layer], m, i) for p, m, i in indexed], len(rows), width) for layer in layers]
        lengths = torch.empty(len(rows), dtype=indexed[0][0].lengths.dtype, device=device)
        for prefix, members, index in indexed:
            lengths[members] = prefix.lengths.index_select(0, index)
    attention = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    return keys, values, attention, lengths


def _stack(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], count: int, width: int) -> torch.Tensor:
    """One layer's [B, kv_heads, width, head_dim] from each example set's cached tensor (with the batch rows it
    fills and its own rows), zero-padded to `width`; on the layer's device (device_map may spread layers)."""
    first = parts[0][0]
    stacked = first.new_zeros((count, first.shape[1], width, first.shape[3]))
    for source, members, index in parts:
        stacked[members.to(first.device), :, : source.shape[2]] = source.index_select(0, index.to(source.device))
    return stacked
