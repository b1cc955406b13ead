"""Loading a frozen local copy of a model for the white-box methods (prompt tuning, GDFO's student).

Names resolve through `lmaas_protocol.model_source`, as on the server, so a name means the same weights on
both sides and a GGUF file is de-quantised once into the cache folder both share
(``<cache_dir>/converted/<name>-<key>``, default ``~/.cache/lmaas``). Torch and transformers are imported
inside the functions: this module is importable without the optional `local` extra.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from lmaas_protocol.hf_models import config_family, dequantised
from lmaas_protocol.model_source import (
    DEFAULT_CACHE_DIR,
    ModelSourceError,
    resolve_source,
)

Family = Literal["masked", "causal"]


class LocalModelError(RuntimeError):
    pass


def require_torch():
    """Import torch, or say how to install the optional extra."""
    try:
        import torch
        import transformers  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LocalModelError(
            "white-box methods (prompt-tuning, gdfo) need the optional extra: pip install 'lmaas-client[local]'"
        ) from exc
    return torch


def load_frozen(spec: str | None, device: str, dtype: str, cache_dir: str | Path | None):
    """(model, tokenizer, name, family): the model in eval mode, no parameter requiring a gradient."""
    torch = require_torch()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        source = resolve_source(spec)
    except ModelSourceError as exc:
        raise LocalModelError(str(exc)) from exc
    path = source.path
    if source.gguf_file is not None:
        # the de-quantised copy in the cache both sides share, converted here if the server has not yet
        path = dequantised(source, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR).path
    config = AutoConfig.from_pretrained(path)
    family = _detect_family(config)
    torch_device = torch.device(
        "cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device)
    )
    torch_dtype = torch.float32 if dtype == "auto" else getattr(torch, dtype)
    auto_class = AutoModelForMaskedLM if family == "masked" else AutoModelForCausalLM
    model = auto_class.from_pretrained(path, dtype=torch_dtype).to(torch_device)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model, tokenizer, source.name, family


def _detect_family(config) -> Family:
    family = config_family(config)
    if family is None:
        raise LocalModelError(f"model type {config.model_type!r} is neither a masked nor a causal language model")
    return family  # type: ignore[return-value]
