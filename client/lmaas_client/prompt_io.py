"""Tuned prompts on disk: a NumPy .npz (no pickles) with the prompt arrays and a JSON metadata string.

Keys (each present only if the prompt has it): `prompt_token_ids` [P] int64, `soft_prompt` [P, hidden]
float32, `deep_prompt_<i>` [P, hidden] float32 for layer i, `offset_a` [s, r], `offset_b` [r, hidden],
`offset_scale` (scalar), `z` (the optimizer's point), and `meta` (JSON: task, template, model, family,
placement, method, seed). Projected tensors are saved computed, so the file needs nothing but numpy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from lmaas_client.prompts import LowRank, PromptCandidate

DEEP_PREFIX = "deep_prompt_"


def save_prompt(path: Path, prompt: PromptCandidate, meta: dict[str, Any]) -> None:
    prompt = prompt.materialized()
    arrays: dict[str, np.ndarray] = {"meta": np.array(json.dumps({**prompt.meta, **meta}, sort_keys=True))}  # run wins
    if prompt.token_ids is not None:
        arrays["prompt_token_ids"] = np.asarray(prompt.token_ids, dtype=np.int64)
    if prompt.soft is not None:
        arrays["soft_prompt"] = np.asarray(prompt.soft, dtype=np.float32)
    for layer, part in enumerate(prompt.deep or ()):
        if part is not None:
            arrays[f"{DEEP_PREFIX}{layer}"] = np.asarray(part, dtype=np.float32)
    if prompt.offset is not None:
        arrays["offset_a"] = np.asarray(prompt.offset.a, dtype=np.float32)
        arrays["offset_b"] = np.asarray(prompt.offset.b, dtype=np.float32)
        arrays["offset_scale"] = np.asarray(prompt.offset.scale, dtype=np.float64)
    if prompt.z is not None:
        arrays["z"] = np.asarray(prompt.z, dtype=np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        np.savez(handle, **arrays)


def load_prompt(path: Path) -> tuple[PromptCandidate, dict[str, Any]]:
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["meta"])) if "meta" in data else {}
        layers = sorted(int(k.removeprefix(DEEP_PREFIX)) for k in data.files if k.startswith(DEEP_PREFIX))
        deep = None
        if layers:
            deep = [None] * (layers[-1] + 1)
            for layer in layers:
                deep[layer] = np.array(data[f"{DEEP_PREFIX}{layer}"], dtype=np.float32)
        offset = None
        if "offset_a" in data:
            offset = LowRank(np.array(data["offset_a"]), np.array(data["offset_b"]), float(data["offset_scale"]))
        candidate = PromptCandidate(
            token_ids=[int(i) for i in data["prompt_token_ids"]] if "prompt_token_ids" in data else None,
            soft=np.array(data["soft_prompt"], dtype=np.float32) if "soft_prompt" in data else None,
            deep=deep,
            offset=offset,
            z=np.array(data["z"]) if "z" in data else None,
        )
    return candidate, meta
