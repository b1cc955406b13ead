"""Facts measured about a frozen model: its length limit, embedding and layer stds (the server reports them in
`ModelInfo` at start-up; the client's local copy compares them with the served model's)."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from lmaas_protocol import Example, InputsSpec
from lmaas_runtime.hooks import capture_layer_inputs
from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.rendering import RenderedExample

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

EMBEDDING_STD_CHUNK = 8192  # vocabulary rows embedded at a time when measuring the embedding std
CLIP_ROUNDS, CLIP_SIGMAS = 5, 3.0  # BBTv2's outlier clipping before taking a layer's std
LAYER_STD_BATCH_TOKENS = 16384  # padded tokens per pass when measuring layer stds
LAYER_STD_VALUES = 1 << 22  # float32 values kept per layer (16 MiB, host memory); a subsample beyond

# A fixed, varied probe set: the hidden-state statistics of ModelInfo.layer_std are measured on it.
PROBE_TEXTS = (
    "the movie was a delight from start to finish .",
    "The central bank raised interest rates by a quarter point on Tuesday.",
    "A man is playing a guitar on a crowded street corner.",
    "I would not recommend this restaurant to anyone; the service was slow.",
    "The team scored twice in the final minutes to win the championship.",
    "Photosynthesis converts light energy into chemical energy in plants.",
    "She said the meeting had been moved to Friday afternoon.",
    "an ambitious , sprawling , and ultimately hollow film .",
)


def model_max_length(model: torch.nn.Module, tokenizer: Any) -> int:
    """The longest input: position embeddings (RoBERTa's offset taken off) and the tokenizer's limit."""
    positions = getattr(model.config, "max_position_embeddings", None)
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(positions, int) and isinstance(padding_idx, int):
        positions -= padding_idx + 1  # RoBERTa-style position ids start after the padding index
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    finite = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(finite) if finite else 2048


def embedding_std(embedding: torch.nn.Module) -> float:
    """Std of the embedding layer's *outputs* over the vocabulary (includes any built-in scaling, e.g. Gemma)."""
    import torch

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


def probe_inputs(causal: bool) -> InputsSpec:
    """The fixed probe set as inputs with a {prompt} slot (after the text for a causal LM: prefix-cacheable)."""
    template = "Text: {text_a}\n{prompt}Answer:{mask}" if causal else "{text_a} {prompt} It was {mask} ."
    examples = [Example(text_a=t) for t in PROBE_TEXTS]
    return InputsSpec(template=template, examples=examples, verbalizer=[[0], [1]], truncate=True)


def clipped_std(values: torch.Tensor) -> float:
    """Std after dropping values beyond mean +- 3 std, five times (BBTv2's statistic)."""
    values = values.double().flatten()
    for _ in range(CLIP_ROUNDS):
        mean, std = values.mean(), values.std()
        kept = values[(values - mean).abs() <= CLIP_SIGMAS * std]
        if len(kept) == len(values) or len(kept) < 2:
            break
        values = kept
    return float(values.std())


@inference_mode
def layer_std(
    model: torch.nn.Module,
    layers: Sequence[torch.nn.Module],
    rendered: Sequence[RenderedExample],
    pad_id: int,
    max_batch_tokens: int = LAYER_STD_BATCH_TOKENS,
    max_values: int = LAYER_STD_VALUES,
) -> list[float]:
    """Clipped std of the hidden states entering each layer, over the real tokens of `rendered`.

    Bounded memory: the examples run in passes of at most `max_batch_tokens` padded tokens, and each layer's
    values move to host memory after each pass, at most `max_values` per layer: beyond that every k-th real
    token is kept (a uniform subsample; exact below it, e.g. 32 examples x 100 tokens x hidden 1024).
    """
    import torch

    device = model.get_input_embeddings().weight.device
    hidden = int(model.get_input_embeddings().weight.shape[1])
    stride = max(1, math.ceil(sum(len(e.ids) for e in rendered) * hidden / max_values))
    kept: list[list[torch.Tensor]] = [[] for _ in layers]
    seen = 0  # real tokens of earlier passes: each token's global index decides whether it is kept
    for chunk in _passes(rendered, max_batch_tokens):
        ids, attention = _padded([e.ids for e in chunk], pad_id)
        real = attention.bool()
        index = seen + real.flatten().cumsum(0).reshape(real.shape) - 1  # [B, T] global index of real tokens
        keep = (real & (index % stride == 0)).to(device)
        seen += int(real.sum())
        captured, handles = capture_layer_inputs(layers, keep)
        try:
            model.base_model(input_ids=ids.to(device), attention_mask=attention.to(device))
        finally:
            for handle in handles:
                handle.remove()
        # Entry 0 is where deep_prompt[0] is added: the word embeddings themselves (before any position
        # embeddings or normalization that the input of layer 0 already contains).
        captured[0] = model.get_input_embeddings()(ids.to(device))[keep].float()
        for i, values in enumerate(kept):
            values.append(captured[i].cpu())  # [kept tokens, hidden] float32, off the accelerator
    return [clipped_std(torch.cat(values)) for values in kept]


def _passes(rendered: Sequence[RenderedExample], max_batch_tokens: int) -> Iterator[list[RenderedExample]]:
    """Consecutive examples cut so that rows x the longest <= max_batch_tokens (at least one row a pass)."""
    chunk: list[RenderedExample] = []
    for example in rendered:
        widest = max([len(example.ids), *(len(e.ids) for e in chunk)])
        if chunk and (len(chunk) + 1) * widest > max_batch_tokens:
            yield chunk
            chunk = []
        chunk.append(example)
    if chunk:
        yield chunk


def _padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and attention mask [B, T] (on the CPU)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    for b, row in enumerate(rows):
        ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
        attention[b, : len(row)] = 1
    return ids, attention
