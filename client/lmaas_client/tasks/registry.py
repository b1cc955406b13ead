"""The task registry: every shipped task by name (`TASKS`); user tasks are built from files, not registered."""

from __future__ import annotations

from lmaas_client.tasks.spec import TaskError, TaskSpec

TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; shipped tasks: {', '.join(sorted(TASKS))}") from None
