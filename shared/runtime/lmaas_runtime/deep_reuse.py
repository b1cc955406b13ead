"""Deep prompts that reuse the frozen layers: layers below the first varying deep prompt run once per base.

In a BBTv2 generation every candidate carries the same deep prompts on every layer but the one being tuned
(layer L). For one example, the hidden states entering layers 0..L-1 are then the same for the whole
population: they are computed once per (example, shared prompts below L) — a *base* — and only layers
L..N-1 run per row, on the base's hidden states fanned out to its rows. Over a round of N generations that
skips about half the layer work.

Nothing on the wire changes: the server detects the sharing itself. Prompts of one request that were
projected from the same z are the same tensor object (the decoder's projection cache), and raw tensors are
compared by value (`torch.equal`), so clients that send full deep prompts get the reuse too.

How it runs, inside the ordinary forward pass (`Forward.vocab_logits` wraps its model call in `reusing`):
1. the base rows' embeddings, masks, positions and cached text keys/values (a slice of the batch's own
   inputs) go through the base model with the deep prompts of layers < L; a pre-hook on layer L captures
   its input [U, T, H] and stops the pass;
2. the batch's own pass then runs with the layer stack cut to layers L..N-1 and a pre-hook on layer L that
   replaces its input by the captured states, expanded to the batch's rows [B, T, H] (whatever the
   embedding layer computed is discarded); deep prompts of layers >= L are added as usual.
Cutting the stack relies on the base model looping over its layer list and on attention layers finding
their cache by their own layer index; that holds for the architectures listed in `SUPPORTED` (tested
against the plain path), every other model takes the plain path.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lmaas_runtime.rows import Row, RowPrompt

if TYPE_CHECKING:
    import torch

SUPPORTED = frozenset({"llama", "gpt2", "bert", "roberta"})  # model types tested against the plain path
MIN_SAVING = 0.1  # reuse only when it skips at least this share of the layer work (the base pass has overhead)


@dataclass(frozen=True)
class Plan:
    layer: int  # L: layers below it run once per base
    bases: list[int]  # batch index of each base's representative row [U]
    base_of: list[int]  # per row, the index of its base in `bases` [B]


class _Stop(Exception):
    """Raised by the capture hook: the rest of the base pass is not needed."""


class LayerReuse:
    """Plans and installs the reuse for one model (created by `Forward`)."""

    def __init__(self, model: torch.nn.Module, layers: Sequence[torch.nn.Module]):
        self.model = model
        self.layers = layers
        self.parent, self.attribute = _owner(model, layers)
        self.enabled = str(getattr(model.config, "model_type", "")) in SUPPORTED and self.parent is not None

    @contextmanager
    def reusing(self, batch: Sequence[Row], embeds: torch.Tensor, kwargs: dict, hooks: Any) -> Iterator[None]:
        """Around the batch's model call: compute the shared layers once and cut them from that call.

        `embeds` [B, T, H] and `kwargs` are the call's inputs; `hooks` the DeepPromptHooks whose additions
        (layer -> rows, positions, values) are set for the whole batch.
        """
        plan = plan_reuse(batch, len(self.layers)) if self.enabled else None
        if plan is None:
            yield
            return
        import torch

        additions = hooks.additions
        hidden = self._bases(plan, embeds, kwargs, hooks)  # [U, T, H] entering layer L
        expanded = hidden.index_select(0, torch.tensor(plan.base_of, device=hidden.device))  # [B, T, H]
        hooks.additions = {layer: a for layer, a in additions.items() if layer >= plan.layer}
        handle = self.layers[plan.layer].register_forward_pre_hook(_replace(expanded), with_kwargs=True, prepend=True)
        original = getattr(self.parent, self.attribute)
        setattr(self.parent, self.attribute, torch.nn.ModuleList(list(self.layers)[plan.layer :]))
        try:
            yield
        finally:
            setattr(self.parent, self.attribute, original)
            handle.remove()
            hooks.additions = additions

    def _bases(self, plan: Plan, embeds: torch.Tensor, kwargs: dict, hooks: Any) -> torch.Tensor:
        """Stage 1: the base rows through layers 0..L-1 with their deep prompts; layer L's input [U, T, H]."""
        import torch

        index = torch.tensor(plan.bases, device=embeds.device)
        additions = hooks.additions
        hooks.additions = _base_additions(additions, plan, embeds.device)
        captured: list[torch.Tensor] = []

        def capture(module, args, kw):
            captured.append(args[0] if args else kw["hidden_states"])
            raise _Stop

        handle = self.layers[plan.layer].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            base_kwargs = {
                name: _rows_of(value, index, plan.layer, self.model.config) for name, value in kwargs.items()
            }
            self.model.base_model(inputs_embeds=embeds.index_select(0, index), **base_kwargs)
        except _Stop:
            pass
        finally:
            handle.remove()
            hooks.additions = additions
        if not captured:
            raise RuntimeError("the base pass never reached the varying layer")
        return captured[0]


def plan_reuse(batch: Sequence[Row], num_layers: int) -> Plan | None:
    """The layer L and the bases that minimise layer work, or None when the plain path is as good.

    Rows share a base below L when they run the same tokens (example, prompt tokens, cached text row) and
    carry equal prompts on layers 0..L-1 (layer 0: the word-embedding level). Work in row-layers:
    U(L) * L + B * (N - L) against B * N.
    """
    if len(batch) < 2 or num_layers < 2 or not any(row.prompt.deep for row in batch):
        return None
    if any(row.prompt.touches_text for row in batch):  # offsets change the text: rare, never shared
        return None
    tokens = _LayerTokens()
    classes: dict[Any, int] = {}
    current = [_intern(classes, _row_key(row)) for row in batch]
    plain = len(batch) * num_layers
    best: tuple[int, int, list[int]] | None = None  # (work, L, classes)
    for layer in range(1, num_layers):
        current = [
            _intern(classes, (c, tokens.of(row.prompt, layer - 1))) for c, row in zip(current, batch, strict=True)
        ]
        work = len(set(current)) * layer + len(batch) * (num_layers - layer)
        if best is None or work < best[0]:
            best = (work, layer, current)
    if best is None or best[0] > (1 - MIN_SAVING) * plain:
        return None
    _, layer, final = best
    bases: list[int] = []
    position: dict[int, int] = {}
    base_of = []
    for b, c in enumerate(final):
        if c not in position:
            position[c] = len(bases)
            bases.append(b)
        base_of.append(position[c])
    return Plan(layer, bases, base_of)


class _LayerTokens:
    """A small int per (layer, prompt tensor), equal for equal tensors (identity first, then by value)."""

    def __init__(self) -> None:
        self.by_id: dict[tuple[int, int], int] = {}
        self.representatives: dict[int, list[torch.Tensor]] = {}

    def of(self, prompt: RowPrompt, layer: int) -> int:
        import torch

        tensor = prompt.soft if layer == 0 else prompt.deep.get(layer)
        if tensor is None:
            return -1
        key = (layer, id(tensor))
        if key not in self.by_id:
            seen = self.representatives.setdefault(layer, [])
            match = next(
                (
                    i
                    for i, other in enumerate(seen)
                    if other.shape == tensor.shape and other.dtype == tensor.dtype and torch.equal(other, tensor)
                ),
                None,
            )
            if match is None:
                seen.append(tensor)
                match = len(seen) - 1
            self.by_id[key] = match
        return self.by_id[key]


def _row_key(row: Row) -> tuple:
    """What must match for two rows to run the same tokens on the same cached text."""
    prompt = row.prompt
    ids = tuple(prompt.token_ids) if prompt.token_ids is not None else None
    return (id(row.example), id(row.prefix), row.prefix_row, prompt.length, ids)


def _intern(table: dict[Any, int], key: Any) -> int:
    return table.setdefault(key, len(table))


def _base_additions(additions: dict, plan: Plan, device: torch.device) -> dict:
    """The batch's additions of layers < L, kept for the base rows and renumbered to their index in `bases`."""
    import torch

    count = len(plan.base_of)
    remap = torch.full((count,), -1, dtype=torch.long, device=device)
    remap[torch.tensor(plan.bases, device=device)] = torch.arange(len(plan.bases), device=device)
    kept = {}
    for layer, (rows, positions, values) in additions.items():
        if layer >= plan.layer:
            continue
        new_rows = remap.to(rows.device)[rows]
        keep = new_rows >= 0
        kept[layer] = (new_rows[keep], positions[keep], values[keep.to(values.device)])
    return kept


def _rows_of(value: Any, index: torch.Tensor, layers: int, config: Any) -> Any:
    """One model-call input restricted to the base rows: tensors [B, ...] and a cache of the first `layers`."""
    import torch
    from transformers import DynamicCache

    if isinstance(value, torch.Tensor):
        return value.index_select(0, index.to(value.device))
    if isinstance(value, DynamicCache):  # only layers < L are read; a fresh cache, so the batch's stays intact
        data = [
            (
                layer.keys.index_select(0, index.to(layer.keys.device)),
                layer.values.index_select(0, index.to(layer.values.device)),
            )
            for layer in value.layers[:layers]
        ]
        return DynamicCache(ddp_cache_data=data, config=config)
    return value


def _replace(expanded: torch.Tensor):
    """Pre-hook (run before the deep-prompt hook) giving layer L the fanned-out base states [B, T, H]."""

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape != expanded.shape:
            raise RuntimeError(f"layer input {tuple(hidden.shape)} is not the reused states' {tuple(expanded.shape)}")
        states = expanded.to(hidden.device, hidden.dtype)
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    return hook


def _owner(model: torch.nn.Module, layers: Sequence[torch.nn.Module]) -> tuple[Any, str]:
    """The module and attribute name that hold the layer list (to cut it for one call), or (None, "")."""
    for module in model.base_model.modules():
        for name, child in module.named_children():
            if child is layers:
                return module, name
    return None, ""
