"""Loading a task's examples: the shipped splits or a user task's files, and the quick test subsample.

Shipped tasks read data/<task>/16-<seed>/{train,dev}.jsonl and data/<task>/test.jsonl; user tasks
(:mod:`lmaas_client.tasks.files`) read their own files through `TaskSpec.loader`. Both go through
`load_split` / `load_test` / `load_task_data`, so a runner treats them alike.

Test sets: by default a task is scored on its *quick* test set, a class-stratified subsample of
`TaskSpec.quick_test_size` examples drawn with the fixed seed `QUICK_TEST_SEED` (0), independent of the run's
seed, so every run of every method scores the same examples (agnews and snli: 1,000 of 7,600 / 9,824; the
other shipped tasks: the full set; dbpedia's test file is itself a fixed 256-example subsample). Ask for
"full" to score the whole set, or for another size (drawn with the same fixed seed).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lmaas_client.tasks.spec import Split, TaskError, TaskSpec
from lmaas_protocol import Example

__all__ = [
    "DATA_DIR_ENV",
    "QUICK_TEST_SEED",
    "Split",
    "TaskData",
    "TestSize",
    "load_split",
    "load_task_data",
    "load_test",
    "resolve_data_dir",
    "split_path",
    "stratified_subsample",
    "resolve_test_size",
]

DATA_DIR_ENV = "LMAAS_DATA_DIR"
QUICK_TEST_SEED = 0  # the seed of every test subsample: fixed, so all runs score the same test examples
TestSize = int | Literal["full"] | None  # None: the task's quick default; "full": every test example


def resolve_data_dir(explicit: str | Path | None = None) -> Path:
    """--data-dir, else $LMAAS_DATA_DIR, else ./data, else the repository's data/ (editable installs).

    A folder named explicitly (option or variable) must hold the data: it is never silently replaced.
    """
    named = explicit or os.environ.get(DATA_DIR_ENV)
    if named:
        if not (Path(named) / "sst2").is_dir():
            raise TaskError(f"{named}: not a data folder (it has no sst2/ subfolder)")
        return Path(named)
    for candidate in (Path.cwd() / "data", Path(__file__).resolve().parents[3] / "data"):
        if (candidate / "sst2").is_dir():
            return candidate
    raise TaskError(f"no data folder found; pass --data-dir or set {DATA_DIR_ENV} (it holds sst2/, agnews/, ...)")


def split_path(task: TaskSpec, split: Split, seed: int, data_dir: Path) -> Path:
    """Where a shipped task's split lives (one test set for all seeds)."""
    if split == "test":
        return data_dir / task.name / "test.jsonl"
    if seed not in task.seeds:
        raise TaskError(f"seed {seed} has no split for {task.name}; available seeds: {list(task.seeds)}")
    return data_dir / task.name / f"16-{seed}" / f"{split}.jsonl"


def load_split(task: TaskSpec, split: Split, seed: int, data_dir: str | Path | None = None) -> list[Example]:
    """A split's examples, in file order. User tasks read their own files (`data_dir` is not used)."""
    if split not in ("train", "dev", "test"):
        raise TaskError(f"unknown split {split!r}; use train, dev or test")
    if task.loader is not None:
        return task.loader(split, seed)
    path = split_path(task, split, seed, resolve_data_dir(data_dir))
    if not path.exists():
        raise TaskError(f"{path}: missing split file")
    examples = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                example = Example(**{k: record[k] for k in (*task.text_fields, "label")})
            except (ValueError, KeyError, TypeError) as exc:
                raise TaskError(f"{path}:{line_no}: bad record ({exc})") from None
            if not 0 <= example.label < task.num_classes:  # type: ignore[operator]
                raise TaskError(f"{path}:{line_no}: label {example.label} is not a class id of {task.name} "
                                f"(0..{task.num_classes - 1})")  # fmt: skip
            examples.append(example)
    return examples


def resolve_test_size(task: TaskSpec, size: TestSize = None) -> int | None:
    """The subsample size `size` stands for: None = the task's quick size, "full" = None (everything)."""
    if size is None:
        return task.quick_test_size
    if size == "full":
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise TaskError(f"test size must be a positive integer, 'full' or None (the default), not {size!r}")
    return size


def load_test(task: TaskSpec, size: TestSize = None, data_dir: str | Path | None = None) -> list[Example]:
    """The test examples to score: the task's quick subsample by default, "full" for all, or `size` of them
    (class-stratified, in file order, drawn with the fixed QUICK_TEST_SEED whatever the run's seed)."""
    return stratified_subsample(load_split(task, "test", 0, data_dir), resolve_test_size(task, size), QUICK_TEST_SEED)


@dataclass(frozen=True)
class TaskData:
    """Everything one run reads: the few-shot splits of one seed and the test examples to score."""

    train: list[Example]
    dev: list[Example]
    test: list[Example]
    test_full_size: int  # examples in the whole test set
    test_subsample_seed: int | None  # QUICK_TEST_SEED when `test` is a subsample, None when it is the full set

    def describe(self) -> dict[str, int | None]:
        """For result files: sizes and the subsample seed."""
        return {"train": len(self.train), "dev": len(self.dev), "test": len(self.test),
                "test_full_size": self.test_full_size, "test_subsample_seed": self.test_subsample_seed}  # fmt: skip


def load_task_data(
    task: TaskSpec, seed: int, data_dir: str | Path | None = None, test_size: TestSize = None
) -> TaskData:
    """Train and dev of split `seed`, and the test examples (see `load_test`), for shipped and user tasks."""
    train = load_split(task, "train", seed, data_dir)
    dev = load_split(task, "dev", seed, data_dir)
    full_test = load_split(task, "test", seed, data_dir)
    test = stratified_subsample(full_test, resolve_test_size(task, test_size), QUICK_TEST_SEED)
    return TaskData(train, dev, test, len(full_test), QUICK_TEST_SEED if len(test) < len(full_test) else None)


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
