"""The forward pass behind the engine: a backend scores rows (one prompt on one rendered example).

The gateway (keys, metering, limits, rendering, projection, calibration, deployed prompts) is the same for
every backend; only `run(rows)` differs:

- `TransformersBackend`: the model in this process (`lmaas_runtime.FrozenLM.run`), with the gateway's prefix
  cache, layer reuse for deep prompts and the scheduler's out-of-memory splitting;
- `VLLMBackend` (vllm_backend.py): a separate `vllm serve` process over its OpenAI-compatible HTTP API, so
  vLLM's own tensor/data parallelism and multi-node setup apply unchanged.

A backend also refuses the candidate forms it cannot serve, before anything is charged (422 naming the form
and the backend), never answering them wrongly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Protocol

from lmaas_protocol import Candidate

if TYPE_CHECKING:
    from lmaas_runtime import FrozenLM, Row
    from lmaas_server.config import Settings


class Backend(Protocol):
    name: str
    prefix_cache: bool  # the gateway's own cache of the text before {prompt} applies (its keys/values are ours)
    round_tokens: int | None  # tokens per scheduler round handed to `run` (None: the engine's max_batch_tokens)
    max_length: int | None  # longest sequence the backend accepts (None: the model's own limit)

    def run(self, rows: Sequence[Row]) -> None:
        """Score every row and write its class logits (float32) into `row.out`."""

    def check_candidate(self, candidate: Candidate, param: str) -> None:
        """Raise `InvalidRequest` for a candidate form this backend cannot serve."""

    def check_verbalizer(self, ids: Sequence[Sequence[int]], param: str) -> None:
        """Raise `InvalidRequest` for a verbalizer this backend cannot score."""

    def close(self) -> None: ...


class TransformersBackend:
    """The frozen model in this process: every candidate form, the gateway's prefix cache."""

    name = "transformers"
    prefix_cache = True
    round_tokens = None
    max_length = None

    def __init__(self, loaded: FrozenLM):
        self.loaded = loaded

    def run(self, rows: Sequence[Row]) -> None:
        self.loaded.run(rows)

    def check_candidate(self, candidate: Candidate, param: str) -> None:
        return None

    def check_verbalizer(self, ids: Sequence[Sequence[int]], param: str) -> None:
        return None

    def close(self) -> None:
        return None


def build_backend(loaded: FrozenLM, settings: Settings) -> Backend:
    if settings.backend == "vllm":
        from lmaas_server.engine.vllm_backend import VLLMBackend

        return VLLMBackend(loaded, settings)
    return TransformersBackend(loaded)
