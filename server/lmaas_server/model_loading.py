"""Find, load and freeze a language model: a Hugging Face id, a local folder or a GGUF file.

GGUF files are de-quantised to a float model once and cached as safetensors under ``cache_dir``
(`lmaas_protocol.hf_models`, the same code as the client's local copy), so later starts take well under a
second.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from lmaas_protocol.hf_models import config_family, dequantised
from lmaas_protocol.model_source import ModelSource, ModelSourceError
from lmaas_protocol.model_source import resolve_source as resolve_spec
from lmaas_server.config import Settings

log = logging.getLogger(__name__)

Family = Literal["masked", "causal"]


class ModelLoadError(RuntimeError):
    pass


@dataclass
class LoadedModel:
    name: str
    family: Family
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def resolve_source(settings: Settings) -> ModelSource:
    """The shared resolution (`lmaas_protocol.model_source`), so the client's local copy finds the same model."""
    try:
        return resolve_spec(settings.model, settings.gguf_file)
    except ModelSourceError as exc:
        raise ModelLoadError(str(exc)) from exc


def detect_family(config: transformers.PretrainedConfig) -> Family:
    """Masked or causal LM, from the saved architecture name, else from the model type."""
    family = config_family(config)
    if family is None:
        raise ModelLoadError(f"model type {config.model_type!r} is neither a masked nor a causal language model")
    return family  # type: ignore[return-value]


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_model(settings: Settings) -> LoadedModel:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    source = resolve_source(settings)
    if source.gguf_file:
        source = dequantised(source, settings.cache_dir)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    config = AutoConfig.from_pretrained(source.path)
    family = detect_family(config) if settings.family == "auto" else settings.family
    auto_class = AutoModelForMaskedLM if family == "masked" else AutoModelForCausalLM
    log.info("loading %s (%s LM) on %s as %s", source.name, family, device, dtype)
    model = auto_class.from_pretrained(source.path, dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    freeze(model)
    return LoadedModel(source.name, family, model, tokenizer, device, dtype)


def freeze(model: torch.nn.Module) -> None:
    """Inference only: eval mode (no dropout) and no parameter ever requires a gradient."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer layers (Llama `layers`, GPT-2 `h`, BERT `encoder.layer`, ...)."""
    count = model.config.num_hidden_layers
    stacks = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not stacks:
        raise ModelLoadError(f"cannot find the {count} transformer layers of {type(model).__name__}")
    return stacks[0]
