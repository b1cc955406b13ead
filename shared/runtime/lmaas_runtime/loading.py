"""Find, load and freeze a language model: a Hugging Face id, a local folder or a GGUF file.

Names resolve through `lmaas_runtime.source` on both sides (server and the client's local white-box copy), so
a name means the same weights; a GGUF file is de-quantised once to a float model cached as safetensors under
``<cache_dir>/converted`` which both read (later starts take well under a second). Masked or causal is told
by the config, through transformers' own head mappings.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from lmaas_runtime.errors import ModelError
from lmaas_runtime.precision import cpu_native_bf16
from lmaas_runtime.source import (
    DEFAULT_CACHE_DIR,
    ModelSource,
    ModelSourceError,
    converted_folder,
    family_of,
    resolve_source,
)

if TYPE_CHECKING:
    import torch
    import transformers

log = logging.getLogger(__name__)

Family = Literal["masked", "causal"]
DEVICE_MAP_STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")


@dataclass
class Loaded:
    """A frozen model and its tokenizer, as `load_frozen` returns them."""

    name: str
    family: Family
    model: torch.nn.Module
    tokenizer: transformers.PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype


def load_frozen(
    spec: str | None,
    *,
    gguf_file: str | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    family: str = "auto",
    cache_dir: str | Path | None = None,
    device_map: str | None = None,
) -> Loaded:
    """Resolve `spec` (None: the offline default), load it on `device` as `dtype` ("auto": see `pick_dtype`)
    and freeze it.

    Weights load straight onto their device (no detour through host memory). `device_map` spreads a model
    too large for one device over several: "auto", "balanced", "sequential" (accelerate fills the GPUs, then
    host memory, then disk under ``<cache_dir>/offload``) or a JSON object of module name -> device.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    try:
        source = resolve_source(spec, gguf_file)
    except ModelSourceError as exc:
        raise ModelError(str(exc)) from exc
    if source.gguf_file:
        source = dequantised(source, Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    config = AutoConfig.from_pretrained(source.path)
    chosen: Family = detect_family(config) if family == "auto" else family  # type: ignore[assignment]
    auto_class = AutoModelForMaskedLM if chosen == "masked" else AutoModelForCausalLM
    placement = parse_device_map(device_map) if device_map else {"": str(torch_device)}
    log.info("loading %s (%s LM) on %s as %s", source.name, chosen, device_map or torch_device, torch_dtype)
    offload = Path(cache_dir) if cache_dir else DEFAULT_CACHE_DIR
    model = with_sdpa(auto_class.from_pretrained, source.path, dtype=torch_dtype, device_map=placement,
                      offload_folder=str(offload / "offload"))  # fmt: skip
    if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
        log.info("layers placed on %s", sorted({str(d) for d in model.hf_device_map.values()}))
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    freeze(model)
    return Loaded(source.name, chosen, model, tokenizer, model.get_input_embeddings().weight.device, torch_dtype)


def parse_device_map(setting: str) -> str | dict[str, Any]:
    """ "auto", "balanced", "balanced_low_0", "sequential", or a JSON object {module name: device}."""
    if setting.lstrip().startswith("{"):
        try:
            placement = json.loads(setting)
        except json.JSONDecodeError as exc:
            raise ModelError(f"device_map is not valid JSON: {exc}") from exc
        if not isinstance(placement, dict):
            raise ModelError("device_map must be a JSON object of module name -> device")
        return placement
    if setting not in DEVICE_MAP_STRATEGIES:
        raise ModelError(f"device_map {setting!r}: use one of {', '.join(DEVICE_MAP_STRATEGIES)} or a JSON object")
    return setting


def with_sdpa(load, path: str, **options: Any) -> torch.nn.Module:
    """Load with PyTorch's fused scaled-dot-product attention; a model without it gets its own default."""
    try:
        return load(path, attn_implementation="sdpa", **options)
    except (ValueError, ImportError) as exc:  # "does not support an attention implementation through sdpa"
        log.info("no SDPA attention for this model (%s); using its default", exc)
        return load(path, **options)


def detect_family(config: transformers.PretrainedConfig) -> Family:
    """Masked or causal LM, from the saved architecture name, else from the model type."""
    family = config_family(config)
    if family is None:
        raise ModelError(f"model type {config.model_type!r} is neither a masked nor a causal language model")
    return family  # type: ignore[return-value]


def pick_device(setting: str) -> torch.device:
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        # bfloat16 where the GPU computes it natively (compute capability 8.0+); else float32, not float16,
        # whose range many models overflow (every candidate would then get a 422 that blames the client)
        return torch.bfloat16 if torch.cuda.get_device_capability(device) >= (8, 0) else torch.float32
    # CPUs with bfloat16 instructions: about 2x less CPU per call, the same SST-2 accuracy (BENCHMARKS.md)
    return torch.bfloat16 if cpu_native_bf16() else torch.float32


def freeze(model: torch.nn.Module) -> None:
    """Inference only: eval mode (no dropout) and no parameter ever requires a gradient."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def transformer_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of transformer layers (Llama `layers`, GPT-2 `h`, BERT `encoder.layer`, ...)."""
    import torch

    count = model.config.num_hidden_layers
    stacks = [m for m in model.base_model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == count]
    if not stacks:
        raise ModelError(f"cannot find the {count} transformer layers of {type(model).__name__}")
    return stacks[0]


def dequantised(source: ModelSource, cache_dir: Path) -> ModelSource:
    """A GGUF source's plain safetensors copy under ``cache_dir/converted``, converted on first use.

    Converting SmolLM2 takes ~18 s on a 2-core CPU; later loads read the copy in well under a second.
    """
    import transformers

    target = converted_folder(source, cache_dir, transformers.__version__)
    if not (target / "config.json").exists():
        _convert(source, target)
    return ModelSource(name=source.name, path=str(target))


def _convert(source: ModelSource, target: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
        staging.rename(target)  # atomic: a server and a client starting together never see half a folder
    except OSError:
        if not (target / "config.json").exists():  # else the other process won the race: use its copy
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def config_family(config: Any) -> str | None:
    """ "masked" or "causal" for a transformers config (None: neither), by transformers' own head mappings."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    return family_of(config.architectures, config.model_type, getattr(config, "is_decoder", False),
                     set(MODEL_FOR_MASKED_LM_MAPPING_NAMES), set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))  # fmt: skip
