"""Find, load and freeze a language model: a Hugging Face id, a local folder or a GGUF file.

GGUF files are de-quantised to a float model by transformers, which takes ~18 s for SmolLM2 on a 2-core
CPU; the converted weights are cached as safetensors under ``cache_dir`` so later starts take well under a
second.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer
from transformers.models.auto.modeling_auto import (
    MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    MODEL_FOR_MASKED_LM_MAPPING_NAMES,
)

from lmaas_protocol.model_source import ModelSource, ModelSourceError, converted_folder, family_of
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
    family = family_of(config.architectures, config.model_type, getattr(config, "is_decoder", False),
                       set(MODEL_FOR_MASKED_LM_MAPPING_NAMES), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))  # fmt: skip
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
        source = _converted_gguf(source, settings.cache_dir)
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


def _converted_gguf(source: ModelSource, cache_dir: Path) -> ModelSource:
    """De-quantise a GGUF model once and cache it as a plain safetensors folder."""
    target = converted_folder(source, cache_dir, transformers.__version__)
    if not (target / "config.json").exists():
        _convert(source, target)
    return ModelSource(name=source.name, path=str(target))


def _convert(source: ModelSource, target: Path) -> None:
    log.info("converting %s/%s (one time, cached in %s)", source.path, source.gguf_file, target)
    model = AutoModelForCausalLM.from_pretrained(source.path, gguf_file=source.gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source.path, gguf_file=source.gguf_file)
    # The de-quantised weights are plain float tensors; drop the GGUF marker so they can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic: concurrent starts never see a half-written folder
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer layers (Llama `layers`, GPT-2 `h`, BERT `encoder.layer`, ...)."""
    count = model.config.num_hidden_layers
    stacks = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not stacks:
        raise ModelLoadError(f"cannot find the {count} transformer layers of {type(model).__name__}")
    return stacks[0]
