"""A local, white-box copy of the served model for prompt tuning and GDFO's student: the runtime's `FrozenLM`.

Needs the optional extra (`pip install 'lmaas-client[local]'`, which brings `lmaas-runtime`: torch and
transformers). The runtime is the server's own, so the local copy resolves names, renders, inserts prompts and
reads labels exactly as the served model does, and shares a converted GGUF with the server under
``~/.cache/lmaas/converted``. This module imports none of it at import time: `import lmaas_client.local_model`
stays torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # typing only: the runtime (and torch) is imported lazily
    from lmaas_runtime.frozen import FrozenLM

try:  # the runtime's own error when the extra is installed, so a caller catches one class
    from lmaas_runtime.errors import ModelError as LocalModelError
except ImportError:  # pragma: no cover - without the `local` extra

    class LocalModelError(RuntimeError):  # type: ignore[no-redef]
        pass


__all__ = ["DEFAULT_MAX_SEQ_LEN", "LocalModelError", "load_local"]

DEFAULT_MAX_SEQ_LEN = 512  # the server's default `max_seq_len`


def load_local(
    spec: str | None = None,
    *,
    device: str = "cpu",
    dtype: str = "float32",
    cache_dir: str | Path | None = None,
    max_length: int | None = None,
) -> FrozenLM:
    """Load and freeze a model (a hub id, folder or .gguf file; None: the server's offline default). Its
    length limit is the server's default `max_seq_len` (or `max_length`) capped by the model's own."""
    try:
        from lmaas_runtime.frozen import FrozenLM
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise LocalModelError(
            "white-box methods (prompt-tuning, gdfo) need the optional extra: pip install 'lmaas-client[local]'"
        ) from exc
    dtype = "float32" if dtype == "auto" else dtype  # the local copy trains: full precision unless asked
    return FrozenLM.load(
        spec, device=device, dtype=dtype, cache_dir=cache_dir, max_length=max_length or DEFAULT_MAX_SEQ_LEN
    )
