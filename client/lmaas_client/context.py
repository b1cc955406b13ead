"""What a tuner may use in `setup()`: the task, its few-shot data, the served model and the API."""

from __future__ import annotations

from dataclasses import dataclass

from lmaas_client.client import LMaaSClient
from lmaas_client.evaluation import TaskScorer
from lmaas_client.tasks import TaskSpec
from lmaas_protocol import Example, ModelInfo


@dataclass
class TuneContext:
    client: LMaaSClient
    task: TaskSpec
    info: ModelInfo
    scorer: TaskScorer  # template, verbalizer token ids, call counting
    train: list[Example]
    dev: list[Example]
    seed: int
    placement: str
    resumed: bool = False  # True when continuing from a checkpoint (the tuner's state is already loaded)
