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
    [B, width] (0 on padding) and the real lengths [B] (where each row's positions continue).
    """
    import torch

    width = max(prefix.width for prefix, _ in rows)
    lengths = torch.stack([prefix.lengths[index] for prefix, index in rows])
    attention = (torch.arange(width, device=device)[None, :] < lengths[:, None]).long()
    groups: dict[int, tuple[PrefixKV, list[int], list[int]]] = {}
    for b, (prefix, index) in enumerate(rows):
        groups.setdefault(id(prefix), (prefix, [], []))
        groups[id(prefix)][1].append(b)
        groups[id(prefix)][2].append(index)
    keys = [_stack([prefix.keys[layer] for prefix, *_ in groups.values()], groups, len(rows), width, device)
            for layer in range(len(rows[0][0].keys))]  # fmt: skip
    values = [_stack([prefix.values[layer] for prefix, *_ in groups.values()], groups, len(rows), width, device)
              for layer in range(len(rows[0][0].values))]  # fmt: skip
    return keys, values, attention, lengths


def _stack(sources: list[torch.Tensor], groups: dict, count: int, width: int, device: torch.device) -> torch.Tensor:
    """One layer's [B, kv_heads, width, head_dim] from each group's cached tensor, zero-padded to `width`."""
    import torch

    first = sources[0]  # on its layer's device (device_map may spread layers over several)
    stacked = first.new_zeros((count, first.shape[1], width, first.shape[3]))
    for source, (_, members, indices) in zip(sources, groups.values(), strict=True):
        index = torch.tensor(indices, device=source.device)
        stacked[torch.tensor(members, device=first.device), :, : source.shape[2]] = source[index]
    return stacked
