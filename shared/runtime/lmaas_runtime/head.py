"""Label logits in float32 from each row's hidden state at its label position.

A pre-hook on the output embedding (the LM head's vocabulary projection; after BERT's transform) keeps the
hidden state [B, H] at each row's label position and hands the head zero positions, so the [B, vocabulary]
product is never computed. The label words' rows of the head's weight are then applied in float32: a
bfloat16 head would round logits of magnitude 20 to steps of 0.125 before any comparison.

Heads that do more than a linear map (Gemma's soft-capping, Cohere's and Granite's scaling) get their known
scalings; `LabelHead.verify` compares the result with the model's own logits once and, where they differ,
falls back to running the model's head at the label positions (then cast to float32).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lmaas_runtime.lazy import inference_mode
from lmaas_runtime.precision import relative_tolerance

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

VERIFY_SHAPE = (2, 8)  # probe sequences x tokens of the start-up comparison


class LabelHead:
    """The pre-hook on the output embedding and the float32 label logits computed from what it kept."""

    def __init__(self, model: torch.nn.Module):
        import torch

        self.model = model
        self.module = model.get_output_embeddings()  # None: the logits of every position come back
        self.positions: torch.Tensor | None = None  # [B] label position per row, or None (inert)
        self.hidden: torch.Tensor | None = None  # [B, H] kept by the last forward (direct mode)
        weight = getattr(self.module, "weight", None)
        # direct: float32 logits from the kept hidden state; else the model's head runs at the label positions
        self.direct = isinstance(weight, torch.Tensor) and weight.dim() == 2
        if self.module is not None:
            self.module.register_forward_pre_hook(self)

    def __call__(self, module: torch.nn.Module, args: tuple) -> tuple:
        import torch

        if self.positions is None:
            return args
        hidden = args[0]  # [B, T, H]
        at = hidden[torch.arange(hidden.shape[0], device=hidden.device), self.positions.to(hidden.device)]
        if self.direct:
            self.hidden = at  # [B, H]
            return (hidden[:, :0], *args[1:])  # the head maps zero positions: [B, 0, V]
        return (at.unsqueeze(1), *args[1:])  # [B, 1, H] -> the model's own [B, 1, V]

    def reset(self) -> None:
        self.positions = None
        self.hidden = None

    def logits(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits [B, *ids.shape] of the tokens `ids` (any shape) from hidden states [B, H]."""
        import torch

        flat = ids.flatten().to(self.module.weight.device)  # the head's device (device_map)
        weight = self.module.weight[flat].float()  # [n, H]
        bias = getattr(self.module, "bias", None)
        bias = bias[flat].float() if isinstance(bias, torch.Tensor) else None
        out = torch.nn.functional.linear(hidden.to(weight.device).float(), weight, bias)  # [B, n]
        return self._scaled(out).reshape(hidden.shape[0], *ids.shape)

    def _scaled(self, logits: torch.Tensor) -> torch.Tensor:
        import torch

        config = self.model.config.get_text_config()
        scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        if isinstance(scale, (int, float)) and not isinstance(scale, bool):
            logits = logits * scale
        divisor = getattr(config, "logits_scaling", None)  # Granite divides
        if isinstance(divisor, (int, float)) and not isinstance(divisor, bool) and divisor:
            logits = logits / divisor
        cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        if isinstance(cap, (int, float)) and not isinstance(cap, bool) and cap:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @inference_mode
    def verify(self) -> bool:
        """Do the float32 label logits equal the model's own logits (to its dtype's rounding)? If not (or if the
        head cannot be bypassed), switch to the model's head for good. Returns the mode kept (True: direct)."""
        import torch

        weight = self.module.weight if self.direct else None
        if weight is None or weight.device.type == "meta":  # offloaded (device_map): its weights come and go
            self.direct = False
            return False
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(0, weight.shape[0], VERIFY_SHAPE, generator=generator)  # [2, 8] random tokens
        try:
            ids = ids.to(self.model.get_input_embeddings().weight.device)
            last = torch.full((VERIFY_SHAPE[0],), VERIFY_SHAPE[1] - 1, device=ids.device)
            reference = self.model(input_ids=ids).logits[:, -1].float()  # [2, V], the model's own head
            self.positions = last
            self.model(input_ids=ids)
            ours = self.logits(self.hidden, torch.arange(weight.shape[0], device=weight.device))
            reference = reference.to(ours.device)
        except Exception:  # a head that rejects zero positions: keep the model's own
            log.warning("the LM head cannot be bypassed; label logits come from it", exc_info=True)
            self.direct = False
            return False
        finally:
            self.reset()
        difference = float((ours - reference).abs().max())
        limit = relative_tolerance(weight.dtype) * float(reference.abs().max())
        if not difference <= limit:
            log.warning("float32 label logits differ from the model's head by %.3g (limit %.3g); using its head",
                        difference, limit)  # fmt: skip
            self.direct = False
        return self.direct
