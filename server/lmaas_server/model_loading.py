"""The server's settings to the runtime's loader: `lmaas_runtime.FrozenLM.load` does the work (resolution,
GGUF de-quantisation into the cache shared with the client's local copy, family detection, freezing)."""

from __future__ import annotations

import torch

from lmaas_runtime import FrozenLM, ModelError
from lmaas_runtime.loading import transformer_layers
from lmaas_server.config import Settings

ModelLoadError = ModelError  # the name the server used before the runtime existed

__all__ = ["ModelLoadError", "load_model", "transformer_layers"]


def load_model(settings: Settings) -> FrozenLM:
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    return FrozenLM.load(
        settings.model,
        gguf_file=settings.gguf_file,
        device=settings.device,
        dtype=settings.dtype,
        family=settings.family,
        cache_dir=settings.cache_dir,
        device_map=settings.device_map,
    )
