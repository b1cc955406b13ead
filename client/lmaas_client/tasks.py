"""Tasks: label names, templates per model family and prompt placement, label words, metric.

Templates follow BBT's for masked LMs (``<P> . {x} . It was <mask> .``); causal LMs get an answer cue at
the end instead of a mask and leading-space label words. "prefix" puts the prompt before the text (as the
papers do); "suffix" puts it after the text, just before the answer cue, where a causal LM's server can
reuse the text's key/value cache across candidates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from lmaas_protocol import parse_template

Family = Literal["masked", "causal"]
Placement = Literal["prefix", "suffix"]
Metric = Literal["accuracy", "f1"]


class TaskError(ValueError):
    pass


@dataclass(frozen=True)
class TaskSpec:
    name: str
    label_names: tuple[str, ...]
    # templates[family][placement]; each has one {prompt} slot
    templates: dict[Family, dict[Placement, str]]
    label_words: dict[Family, tuple[str, ...]]
    metric: Metric = "accuracy"
    text_fields: tuple[str, ...] = ("text_a",)
    description: str = ""
    seeds: tuple[int, ...] = field(default=(13, 21, 42, 87, 100))

    def __post_init__(self) -> None:
        for family, by_placement in self.templates.items():
            for template in by_placement.values():
                parse_template(template)
            if len(self.label_words[family]) != len(self.label_names):
                raise TaskError(f"task {self.name}: {family} label words do not match the classes")

    def template(self, family: Family, placement: Placement = "prefix") -> str:
        try:
            return self.templates[family][placement]
        except KeyError:
            raise TaskError(f"task {self.name} has no {placement} template for {family} LMs") from None

    @property
    def num_classes(self) -> int:
        return len(self.label_names)


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    TASKS[spec.name] = spec
    return spec


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; shipped tasks: {', '.join(sorted(TASKS))}") from None


register_task(
    TaskSpec(
        name="sst2",
        description="SST-2 movie-review sentiment (GLUE), 16 examples per class",
        label_names=("negative", "positive"),
        templates={
            "masked": {
                "prefix": "{prompt} . {text_a} . It was {mask} .",
                "suffix": "{text_a} . {prompt} It was {mask} .",
            },
            "causal": {
                "prefix": "{prompt}Review: {text_a}\nSentiment:{mask}",
                "suffix": "Review: {text_a}\n{prompt}Sentiment:{mask}",
            },
        },
        label_words={"masked": (" bad", " great"), "causal": (" negative", " positive")},
    )
)
