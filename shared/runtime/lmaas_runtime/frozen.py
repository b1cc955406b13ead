"""`FrozenLM`: one frozen language model with everything both sides do with it.

- the server: `run(rows)` scores batches of rows without gradients (class logits into each row's slot),
  `compute_prefix` caches the text before the {prompt} slot, `layer_std` and `embedding_std` describe it;
- the client's white-box methods (local prompt tuning, GDFO's student): `render` the task exactly as the
  server renders it, `prepare` (the same prefix cache) and `class_logits`, differentiable w.r.t. the soft
  prompt, through the very forward pass the server runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from lmaas_protocol import Example, FieldError, ModelInfo
from lmaas_runtime import probes
from lmaas_runtime.errors import ModelError
from lmaas_runtime.forward import Forward
from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.loading import Family, load_frozen, transformer_layers
from lmaas_runtime.prefix import PrefixKV, compute_prefix, eligible
from lmaas_runtime.rendering import RenderedExample, TemplateRenderer
from lmaas_runtime.rows import Row, RowPrompt, Verbalizer

if TYPE_CHECKING:
    import torch

PREPARE_BATCH_TOKENS = 16384  # token slots per pass when the client caches its examples' text


class FrozenLM:
    """A frozen model and its tokenizer; `max_length` caps the model's own length limit (None: no cap)."""

    def __init__(self, model: Any, tokenizer: Any, name: str, family: Family, max_length: int | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.family: Family = family
        self.causal = family == "causal"
        self.embedding = model.get_input_embeddings()
        self.device = self.embedding.weight.device
        self.dtype = self.embedding.weight.dtype
        self.vocab_size, self.hidden_size = (int(n) for n in self.embedding.weight.shape)
        self.layers = transformer_layers(model)
        self.num_layers = len(self.layers)
        self.architecture = type(model).__name__
        self.model_type = str(model.config.model_type)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = int(pad_id or 0)
        limit = probes.model_max_length(model, tokenizer)
        self.max_length = min(max_length, limit) if max_length else limit
        self.forward = Forward(model, self.layers, self.causal, self.pad_id)
        self.forward.head.verify()  # float32 label logits from the label position, where they equal the head's
        self._embedding_std: float | None = None

    @classmethod
    def load(cls, spec: str | None = None, *, max_length: int | None = None, **options: Any) -> FrozenLM:
        """Load and freeze `spec` (hub id, folder, .gguf; None: the offline default); `options` are
        `loading.load_frozen`'s (gguf_file, device, dtype, family, cache_dir, device_map)."""
        loaded = load_frozen(spec, **options)
        return cls(loaded.model, loaded.tokenizer, loaded.name, loaded.family, max_length)

    # ------------------------------------------------------------------------------------------- facts

    @property
    def embedding_std(self) -> float:
        """Std of the embedding layer's outputs over the vocabulary (`ModelInfo.embedding_std`)."""
        if self._embedding_std is None:
            self._embedding_std = probes.embedding_std(self.embedding)
        return self._embedding_std

    def layer_std(
        self, rendered: Sequence[RenderedExample], max_batch_tokens: int = probes.LAYER_STD_BATCH_TOKENS
    ) -> list[float]:
        return probes.layer_std(self.model, self.layers, rendered, self.pad_id, max_batch_tokens)

    def mismatch(self, info: ModelInfo, std_tolerance: float = 0.01) -> str | None:
        """Why this model is not the served one (None if it looks the same). Checks the architecture, sizes and
        the embedding std (a cheap fingerprint of the weights); a different name alone is accepted (the same
        weights may be served from a hub id and loaded here from a folder)."""
        ours = (self.architecture, self.model_type, self.hidden_size, self.vocab_size, self.num_layers)
        theirs = (info.architecture, info.model_type, info.hidden_size, info.vocab_size, info.num_layers)
        if ours != theirs:
            return (f"the local model {self.name!r} (architecture, type, hidden, vocab, layers) = {ours} is not the served "
                    f"model {info.name!r} {theirs}")  # fmt: skip
        if abs(self.embedding_std - info.embedding_std) > std_tolerance * info.embedding_std:
            return (f"the local model {self.name!r} has embedding std {self.embedding_std:.6g}, the served model "
                    f"{info.name!r} {info.embedding_std:.6g}: different weights")  # fmt: skip
        return None

    # ------------------------------------------------------------------------------------------- text

    def renderer(self, max_length: int | None = None) -> TemplateRenderer:
        try:
            return TemplateRenderer(self.tokenizer, self.causal, max_length or self.max_length)
        except ValueError as exc:  # a masked LM whose tokenizer has no mask token
            raise ModelError(str(exc)) from exc

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
            raise ModelError(f"rendering the task locally: {exc}") from exc

    def label_ids(self, words: Sequence[str]) -> list[list[int]]:
        """First sub-token of each label word (as the client's `build_verbalizer` asks the server)."""
        ids = self.tokenizer(list(words), add_special_tokens=False)["input_ids"]
        if any(not row for row in ids):
            raise ModelError(f"a label word of {list(words)} tokenizes to nothing")
        first = [[int(row[0])] for row in ids]
        if len({f[0] for f in first}) != len(first):
            raise ModelError(f"label words {list(words)} share their first token")
        return first

    # ------------------------------------------------------------------------------------------- forward

    def run(self, rows: Sequence[Row]) -> None:
        """Score one batch of rows (one path: all plain or all prefix-cached) into their `out` slots."""
        self.forward.run(rows)

    def compute_prefix(self, rendered: Sequence[RenderedExample], max_batch_tokens: int) -> PrefixKV:
        return compute_prefix(self.model, rendered, self.pad_id, max_batch_tokens)

    def prepare(self, rendered: Sequence[RenderedExample], cache_text: bool = True) -> Prepared:
        """Rendered examples, with the keys/values of their text before the {prompt} slot computed once
        (causal LMs, every example having text before the slot, `cache_text`): later forwards then run only
        the prompt and what follows it (the server's prefix cache, here with gradients through the prompt)."""
        rendered = list(rendered)
        if not (cache_text and self.causal and rendered and eligible(rendered)):
            return Prepared(rendered)
        prefix = self.compute_prefix(rendered, PREPARE_BATCH_TOKENS)
        return Prepared(rendered, prefix, list(range(len(rendered))))

    def class_logits(
        self,
        rows: Sequence[RenderedExample] | Prepared,
        verbalizer: Sequence[Sequence[int]],
        soft: torch.Tensor | None = None,
        token_ids: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """Label-word logits [len(rows), classes] (float32), differentiable w.r.t. `soft`.

        `rows`: examples from `render` (or `prepare`, which reuses their text's keys/values). `soft` is
        [P, hidden] (one prompt for every example) or [len(rows), P, hidden] (one per row); `token_ids` [P]
        are the discrete tokens under it (None: a pure soft prompt replaces the embeddings). Runs under the
        caller's grad mode (wrap in `torch.no_grad()` for evaluation).
        """
        prepared = rows if isinstance(rows, Prepared) else Prepared(list(rows))
        length = len(token_ids) if token_ids is not None else (0 if soft is None else int(soft.shape[-2]))
        if soft is not None and int(soft.shape[-2]) != length:
            raise ModelError(f"soft prompt has {soft.shape[-2]} rows, token_ids {length}")
        ids = list(token_ids) if token_ids is not None else None
        if soft is not None:
            soft = soft.to(self.dtype)
            soft = soft.expand(len(prepared), -1, -1) if soft.dim() == 2 else soft  # [N, P, H]
        batch = [
            Row(example, RowPrompt(length, ids, None if soft is None else soft[b]))
            for b, example in enumerate(prepared.rendered)
        ]
        if prepared.prefix is not None and length > 0:
            for row, index in zip(batch, prepared.indices, strict=True):
                row.prefix, row.prefix_row = prepared.prefix, index
        hidden, logits = self.forward.label_states(batch)
        return self.forward.class_logits(hidden, logits, Verbalizer.build(verbalizer, self.device))

    @inference_mode
    def prompt_logits(
        self, rendered: Sequence[RenderedExample], verbalizer: Sequence[Sequence[int]], prompts: Sequence[RowPrompt]
    ) -> np.ndarray:
        """Class logits [prompts, examples, classes] of each prompt on every example (plain path, one batch
        per prompt): a reference the cached and batched paths are checked against."""
        out = np.empty((len(prompts), len(rendered), len(verbalizer)), dtype=np.float32)
        built = Verbalizer.build(verbalizer, self.device)
        for c, prompt in enumerate(prompts):
            self.run([Row(example, prompt, built, out[c, e]) for e, example in enumerate(rendered)])
        return out


@dataclass
class Prepared:
    """Rendered examples and, optionally, the cached keys/values of their text before the {prompt} slot
    (`prefix`; `indices[i]` is row i's index in it)."""

    rendered: list[RenderedExample]
    prefix: PrefixKV | None = None
    indices: list[int] | None = None

    def __len__(self) -> int:
        return len(self.rendered)

    def subset(self, rows: Sequence[int]) -> Prepared:
        """These rows, in this order (repeats allowed: K candidates x N examples)."""
        picked = [self.rendered[i] for i in rows]
        if self.prefix is None or self.indices is None:
            return Prepared(picked)
        return Prepared(picked, self.prefix, [self.indices[i] for i in rows])


def project(z: torch.Tensor, matrix: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """A z reshaped to `shape` (z [d] -> [*shape]; z [K, d] -> [K, *shape]), differentiable in z and A."""
    out = z @ matrix
    return out.reshape(*z.shape[:-1], *shape)
