"""The two steps of model loading that need transformers and must agree on both sides.

`model_source` decides where a model comes from with no ML library. The server and the client's local copy
(prompt tuning, GDFO's student) also share two steps that do need transformers: de-quantising a GGUF file
once into the cache folder both read, and telling a masked from a causal LM by its config. They live here
so both sides run the same code. They need the package's optional `hf` extra (torch, transformers, gguf),
which the server and the client's `local` extra require; both are imported inside the functions, so
importing `lmaas_protocol` (or this module) never loads them.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lmaas_protocol.model_source import ModelSource, converted_folder, family_of

log = logging.getLogger(__name__)


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
