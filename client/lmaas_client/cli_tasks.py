"""The CLI's task flags: a user task given by `lmaas tune`'s flags, from files or a Hugging Face dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from lmaas_client.tasks import TaskError, TaskSpec
from lmaas_client.tasks.files import is_task_file, resolve_task, user_task
from lmaas_client.tasks.hf import HF_PREFIX, hf_task, parse_hf_task


def UserTask(help: str):
    return typer.Option(help=help, rich_help_panel="Your own task (instead of a shipped one or a task file)")


def HFTask(help: str, **options):
    return typer.Option(help=help, rich_help_panel="A Hugging Face dataset (--task hf:NAME[:CONFIG] or hf:FOLDER)",
                        **options)  # fmt: skip


def user_task_from_flags(task: str, train, dev, test, text_a, text_b, label_column, label_names, label_words,
                         template, metric, hf: dict[str, Any]) -> TaskSpec | None:  # fmt: skip
    """The task given by flags (the run saves it as task.json), or None for a shipped task or a task file."""
    if task.startswith(HF_PREFIX):
        if any(v is not None for v in (train, dev, test)):
            raise TaskError(
                "a dataset task (--task hf:...) draws its examples from the dataset: drop --train/--dev/--test"
            )
        if not label_words or not template:
            raise TaskError("a dataset task (--task hf:...) also needs --label-word (one per class) and --template")
        name, ref = parse_hf_task(task)
        return hf_task(name, dataset=ref.name, path=ref.path, config=ref.config, label_words=label_words,
                       templates=template.replace("\\n", "\n"), text_a=text_a, text_b=text_b, label=label_column,
                       label_names=label_names, metric=metric, source="flags", **hf)  # fmt: skip
    if train is None:
        if any(v is not None for v in (dev, test, label_names, label_words, template)):
            raise TaskError(
                "your own task needs --train, --dev and --test (and --label-name, --label-word, --template)"
            )
        if not is_task_file(task):
            resolve_task(task)  # an unknown name fails here, before any call
        return None
    missing = [flag for flag, value in (("--dev", dev), ("--test", test), ("--label-name", label_names),
                                        ("--label-word", label_words), ("--template", template)) if not value]  # fmt: skip
    if missing:
        raise TaskError(f"your own task also needs {', '.join(missing)}")
    return user_task(task, train=train, dev=dev, test=test, label_names=label_names, label_words=label_words,
                     templates=template.replace("\\n", "\n"), text_a=text_a, text_b=text_b, label=label_column,
                     metric=metric, base_dir=Path.cwd(), source="flags")  # fmt: skip
