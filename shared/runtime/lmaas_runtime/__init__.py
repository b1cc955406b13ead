"""The frozen language model of lmaas, one implementation for the server and the client's `local` extra.

Modules: `source` (where a model comes from) and `errors` (`ModelError`), both without any ML library;
`loading` (load, de-quantise GGUF, detect the family, freeze), `rendering` (templates into token ids),
`rows` (prompts, rows, verbalizers, batching), `hooks` (prompt insertion inside layers, label positions),
`prefix` (the key/value cache of the text before the prompt), `forward` (the forward pass), `probes`
(lengths, stds), `frozen` (`FrozenLM`, the main object).
"""

from __future__ import annotations

import importlib
from typing import Any

from lmaas_runtime.errors import ModelError

# Resolved on first use, so that `lmaas_runtime.errors` and `lmaas_runtime.source` import without torch.
_LAZY = {
    "FrozenLM": "lmaas_runtime.frozen",
    "Prepared": "lmaas_runtime.frozen",
    "project": "lmaas_runtime.frozen",
    "Family": "lmaas_runtime.loading",
    "PrefixKV": "lmaas_runtime.prefix",
    "RenderedExample": "lmaas_runtime.rendering",
    "TemplateRenderer": "lmaas_runtime.rendering",
    "Row": "lmaas_runtime.rows",
    "RowPrompt": "lmaas_runtime.rows",
    "Verbalizer": "lmaas_runtime.rows",
    "batches": "lmaas_runtime.rows",
}

__all__ = ["ModelError", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lmaas_runtime' has no attribute {name!r}")
