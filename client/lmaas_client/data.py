"""Loading the shipped splits (data/<task>/16-<seed>/{train,dev}.jsonl, data/<task>/test.jsonl)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

import numpy as np

from lmaas_client.tasks import TaskError, TaskSpec
from lmaas_protocol import Example

Split = Literal["train", "dev", "test"]
DATA_DIR_ENV = "LMAAS_DATA_DIR"


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """--data-dir, else $LMAAS_DATA_DIR, else ./data, else the repository's data/ (editable installs).

    A folder named explicitly (option or variable) must hold the data: it is never silently replaced.
    """
    named = explicit or os.environ.get(DATA_DIR_ENV)
    if named:
        if not (Path(named) / "sst2").is_dir():
            raise TaskError(f"{named}: not a data folder (it has no sst2/ subfolder)")
        return Path(named)
    for candidate in (Path.cwd() / "data", Path(__file__).resolve().parents[2] / "data"):
        if (candidate / "sst2").is_dir():
            return candidate
    raise TaskError(f"no data folder found; pass --data-dir or set {DATA_DIR_ENV} (it holds sst2/, agnews/, ...)")


def split_path(task: TaskSpec, split: Split, seed: int, data_dir: Path) -> Path:
    if split == "test":
        return data_dir / task.name / "test.jsonl"
    if seed not in task.seeds:
        raise TaskError(f"seed {seed} has no split for {task.name}; available seeds: {list(task.seeds)}")
    return data_dir / task.name / f"16-{seed}" / f"{split}.jsonl"


def load_split(task: TaskSpec, split: Split, seed: int, data_dir: Path) -> list[Example]:
    path = split_path(task, split, seed, data_dir)
    if not path.exists():
        raise TaskError(f"{path}: missing split file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                examples.append(Example(**{k: record[k] for k in (*task.text_fields, "label")}))
            except (ValueError, KeyError) as exc:
                raise TaskError(f"{path}:{line_no}: bad record ({exc})") from None
    return examples


def stratified_subsample(examples: list[Example], size: int | None, seed: int) -> list[Example]:
    """A fixed, seeded, class-stratified subsample (in original order); None or >= len keeps all."""
    if size is None or size >= len(examples):
        return examples
    labels = np.array([e.label for e in examples])
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / len(examples) * size).astype(int)
    for c in np.argsort(-(counts / len(examples) * size - quota))[: size - quota.sum()]:
        quota[c] += 1  # hand the remainder to the classes with the largest fractional share
    chosen = np.concatenate(
        [rng.choice(np.flatnonzero(labels == c), q, replace=False) for c, q in zip(classes, quota, strict=False)]
    )
    return [examples[i] for i in np.sort(chosen)]
