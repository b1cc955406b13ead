"""Tuned prompts on disk: a NumPy .npz (no pickles) with the prompt arrays and a JSON metadata string.

Keys: `soft_prompt` [P, hidden] float32 (absent for discrete prompts), `prompt_token_ids` [P] int64
(absent for pure soft prompts), `z` (the low-dimensional point, if any), `meta` (JSON: task, template,
model, family, placement, method, seed). Readable anywhere with ``numpy.load(path)``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmaas_client.tuners.base import PromptCandidate


def save_prompt(path: Path, prompt: PromptCandidate, meta: dict[str, Any]) -> None:
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps(meta, sort_keys=True))}
    if prompt.soft is not None:
        arrays["soft_prompt"] = np.asarray(prompt.soft, dtype=np.float32)
    if prompt.token_ids is not None:
        arrays["prompt_token_ids"] = np.asarray(prompt.token_ids, dtype=np.int64)
    if prompt.z is not None:
        arrays["z"] = np.asarray(prompt.z, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def load_prompt(path: Path) -> tuple[PromptCandidate, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        soft = np.array(data["soft_prompt"], dtype=np.float32) if "soft_prompt" in data else None
        ids = [int(i) for i in data["prompt_token_ids"]] if "prompt_token_ids" in data else None
        z = np.array(data["z"]) if "z" in data else None
    return PromptCandidate(soft=soft, token_ids=ids, z=z), meta
