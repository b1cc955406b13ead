"""The settings every user task shares, checked one by one, whatever its examples come from (files or a
Hugging Face dataset): name, label names and values, metric, test size, seeds, label words and templates.

Each check raises `SettingError` naming the setting, so a task file's error can point at its line.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from lmaas_client.tasks.registry import TASKS
from lmaas_client.tasks.spec import METRICS, Family, Placement, SplitLoader, TaskError, TaskSpec
from lmaas_client.tasks.templates import LabelWordsArg, TemplatesArg, label_words_by_family, templates_by_family
from lmaas_protocol.schemas import MAX_CLASSES

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class SettingError(TaskError):
    """A bad setting (not a bad data file): `key` names it, so a task file's error can point at its line."""

    def __init__(self, where: str, key: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class TaskParts:
    """The checked settings every user task has, whatever its examples come from (files or a dataset)."""

    names: list[str]
    values: list[str] | None
    words: dict[Family, tuple[str, ...]]
    templates: dict[Family, dict[Placement, str]]
    text_fields: tuple[str, ...]

    def spec(self, name: str, loader: SplitLoader, metric: str, description: str, quick_test_size: int | None,
             seeds: Sequence[int] | None, instruction: str | None, source: str | None) -> TaskSpec:  # fmt: skip
        return TaskSpec(
            name=name,
            label_names=tuple(self.names),
            templates=self.templates,
            label_words=self.words,
            metric=metric,  # type: ignore[arg-type]
            text_fields=self.text_fields,
            description=description,
            seeds=tuple(seeds or ()),
            quick_test_size=quick_test_size,
            instruction=instruction,
            loader=loader,
            source=source,
        )


def task_parts(name: Any, label_names: Any, label_values: Any, templates: TemplatesArg, label_words: LabelWordsArg,
               pairs: bool, metric: Any, quick_test_size: Any, bad) -> TaskParts:  # fmt: skip
    """Check the settings shared by every user task (one error per setting, naming it through `bad`)."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise bad("name", f"task name {name!r} must be 1-64 letters, digits, '-', '_' or '.'")
    if name in TASKS:
        raise bad("name", f"task name {name!r} is a shipped task's; give your task another name")
    names = strings(label_names, "label_names", bad)
    if not 2 <= len(names) <= MAX_CLASSES:
        raise bad("label_names", f"label_names needs 2 to {MAX_CLASSES} classes, got {len(names)}: {names}")
    if len(set(names)) != len(names):
        raise bad("label_names", f"label_names repeat a name: {names}")
    values = None
    if label_values is not None:
        values = strings(label_values, "label_values", bad)
        if len(values) != len(names) or len(set(values)) != len(values):
            raise bad("label_values", f"label_values must give one distinct value per class ({len(names)}, in "
                                      f"label_names order), got {values}")  # fmt: skip
    if metric not in METRICS:
        raise bad("metric", f"unknown metric {metric!r}; use one of {', '.join(METRICS)}")
    if metric == "f1" and len(names) != 2:
        raise bad("metric", f"metric f1 needs exactly 2 classes (it is the F1 of the second, {names[-1]!r})")
    if quick_test_size is not None and not positive_int(quick_test_size):
        raise bad("quick_test_size", f"quick_test_size must be a positive integer, got {quick_test_size!r}")
    text_fields = ("text_a", "text_b") if pairs else ("text_a",)
    words = label_words_by_family(label_words, len(names), bad)
    return TaskParts(names, values, words, templates_by_family(templates, words, text_fields, bad), text_fields)


def check_seeds(seeds: Any, bad) -> None:
    if seeds is not None and (isinstance(seeds, (str, bytes)) or not isinstance(seeds, Sequence)
                              or not all(is_index(s) for s in seeds)):  # fmt: skip
        raise bad("seeds", f"seeds must be a list of integers, got {seeds!r}")


def positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def strings(values: Any, key: str, bad) -> list[str]:
    if isinstance(values, str) or not isinstance(values, Sequence) or not all(isinstance(v, str) for v in values):
        raise bad(key, f"{key} must be a list of strings, got {values!r}")
    if not all(v.strip() for v in values):
        raise bad(key, f"{key} must not contain empty strings: {list(values)}")
    return list(values)
