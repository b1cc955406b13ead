"""Forward hooks that put prompts into a frozen transformers model (the label position's: `head`).

Hooks instead of a patched model class: any architecture with an output embedding and a stack of layers
works unchanged. The hooks are inert until their state is set for one forward pass, and reset after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class DeepPromptHooks:
    """Pre-hooks on every transformer layer that add deep prompts at the prompt positions (BBTv2)."""

    def __init__(self, layers: Sequence[torch.nn.Module]):
        # layer -> (row indices [n], positions [n], values [n, H]) to add to the layer's input
        self.additions: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for index, layer in enumerate(layers):
            if index > 0:  # layer 0's deep prompt is added to the word embeddings (RowPrompt.soft)
                layer.register_forward_pre_hook(self._hook(index), with_kwargs=True)

    def _hook(self, index: int):
        def add(module, args, kwargs):
            if index not in self.additions:
                return None
            rows, positions, values = self.additions[index]
            hidden = args[0] if args else kwargs["hidden_states"]
            # each layer on its own device (device_map): the additions go where its input is, in its dtype
            where = (rows.to(hidden.device), positions.to(hidden.device))
            hidden = hidden.index_put(where, values.to(hidden.device, hidden.dtype), accumulate=True)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return add


def capture_layer_inputs(layers: Sequence[torch.nn.Module], keep: torch.Tensor) -> tuple[dict, list]:
    """Pre-hooks that store each layer's input hidden states at the `keep` [B, T] positions ([n, H] float32).

    Returns the dict they fill (layer index -> tensor) and the hook handles (remove them after the pass).
    """
    captured: dict[int, torch.Tensor] = {}

    def capture(index: int):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            captured[index] = hidden[keep.to(hidden.device)].float()  # layers may sit on several devices

        return hook

    handles = [layer.register_forward_pre_hook(capture(i), with_kwargs=True) for i, layer in enumerate(layers)]
    return captured, handles
