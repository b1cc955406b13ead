"""Tasks: what a task is (`spec`), the shipped ones (`shipped`, registered in `TASKS` by `registry`), user tasks
from files (`files`, reading them with `readers`, normalising label words and templates with `templates`) and
loading any task's examples (`data`).

Importing this package registers the shipped tasks; the names below are the package's public face.
"""

from lmaas_client.tasks import shipped  # noqa: F401 - registers the shipped tasks
from lmaas_client.tasks.registry import TASKS, get_task, register_task
from lmaas_client.tasks.spec import (
    FAMILIES,
    METRICS,
    PLACEMENTS,
    SHIPPED_SEEDS,
    Family,
    Metric,
    Placement,
    PlacementChoice,
    Split,
    SplitLoader,
    TaskError,
    TaskSpec,
    default_placement,
    prompt_follows_text,
    template_problem,
)

__all__ = [
    "FAMILIES",
    "METRICS",
    "PLACEMENTS",
    "SHIPPED_SEEDS",
    "TASKS",
    "Family",
    "Metric",
    "Placement",
    "PlacementChoice",
    "default_placement",
    "Split",
    "SplitLoader",
    "TaskError",
    "TaskSpec",
    "get_task",
    "prompt_follows_text",
    "register_task",
    "template_problem",
]
