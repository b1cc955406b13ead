"""Classifying new texts with a tuned prompt: the `Predictor` (a prompt.npz, through `/v1/evaluate`), the
`DeployedPrompt` (a prompt deployed on the server, through `/v1/classify`) and the resumable file run behind
`lmaas predict`.

A prompt.npz carries everything needed to use it: the candidate, the task (label names and words), the template
and placement it was tuned with, the model it was tuned on and, when the run fitted one, its calibration. Rows
go to the server in batches (one call per batch, as `evaluate` charges one call per candidate per request);
each batch has an idempotency key derived from the prompt, the batch's rows and its position, so a run that
is interrupted and started again replays the batch that was in flight instead of buying it twice, and the
output file, written and flushed batch by batch, tells where to continue.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmaas_client.calibration import Calibration
from lmaas_client.client import LMaaSClient
from lmaas_client.evaluation import TaskScorer
from lmaas_client.prompt_io import load_prompt
from lmaas_client.prompts import named_specs, projection_names
from lmaas_client.tasks import TaskError
from lmaas_client.tasks.files import resolve_task
from lmaas_protocol import ClassifyText, EvaluateRequest, Example, PromptCalibration, PromptInfo, PromptSpec

MAX_BATCH = 256  # rows per request at most: a request's latency stays in seconds on a CPU server
OUTPUT_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}

Row = tuple[str, Example]  # (row id, example; label None when the input has no label column)


@dataclass
class Prediction:
    id: str
    label: str
    probabilities: dict[str, float]  # class name -> probability (calibrated when the prompt carries a calibration)
    gold: str | None = None

    def record(self) -> dict[str, Any]:
        record: dict[str, Any] = {"id": self.id, "label": self.label, "probabilities": self.probabilities}
        if self.gold is not None:
            record["gold"] = self.gold
        return record


class Predictor:
    """A saved prompt bound to a server: label probabilities for any texts of the prompt's task."""

    def __init__(self, client: LMaaSClient, prompt: str | Path):
        path = Path(prompt)
        self.client = client
        self.candidate, self.meta = load_prompt(path)
        self.task = resolve_task(self.meta["task"])
        served, tuned_on = client.model_info().name, self.meta.get("model")
        if tuned_on and tuned_on != served:
            raise TaskError(f"{path}: tuned on {tuned_on}, but the server serves {served}; a soft prompt only "
                            "works on the model it was tuned for")  # fmt: skip
        self.scorer = TaskScorer(client, self.task, self.meta.get("placement", "prefix"))
        self.scorer.template = self.meta.get("template", self.scorer.template)  # the template it was tuned with
        calibration = self.meta.get("calibration")
        self.calibration = Calibration.from_json(calibration) if calibration else None
        self.fingerprint = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        self.calls = 0

    @property
    def label_names(self) -> list[str]:
        return list(self.task.label_names)

    @property
    def max_batch(self) -> int:
        """Rows per request: the server's max_examples (one call per request)."""
        return min(MAX_BATCH, self.client.model_info().limits.max_examples)

    def spec(self, name: str = "") -> PromptSpec:
        """The prompt as the server stores it: candidate, template, verbalizer, label names, calibration."""
        names = projection_names([self.candidate])
        calibration = None
        if self.calibration is not None:
            calibration = PromptCalibration(bias=[float(b) for b in self.calibration.bias],
                                            scale=self.calibration.scale)  # fmt: skip
        return PromptSpec(name=name, candidate=self.candidate.to_wire(names),
                          projections=named_specs([self.candidate], names) or None, template=self.scorer.template,
                          verbalizer=self.scorer.verbalizer, labels=self.label_names, calibration=calibration,
                          truncate=self.scorer.truncate)  # fmt: skip

    def deploy(self, name: str = "") -> DeployedPrompt:
        """Store this prompt on the server (free); the returned prompt classifies by id, from any HTTP client."""
        return DeployedPrompt(self.client, self.client.deploy(self.spec(name)))

    def probabilities(self, examples: Sequence[Example], idempotency_key: str | None = None) -> np.ndarray:
        """[N, C] class probabilities for up to the server's max_examples examples, in one call."""
        names = projection_names([self.candidate])
        request = EvaluateRequest(**self.scorer.inputs_spec(list(examples)).model_dump(),
                                  candidates=[self.candidate.to_wire(names)],
                                  projections=named_specs([self.candidate], names) or None)  # fmt: skip
        response = self.client.evaluate(request, idempotency_key=idempotency_key)
        self.calls += response.usage.calls
        logits = np.asarray(response.results[0].logits.to_numpy(), dtype=np.float64)  # [N, C]
        if self.calibration is not None:
            logits = self.calibration.apply(logits)
        shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)

    def predict(self, rows: Sequence[Row], idempotency_key: str | None = None) -> list[Prediction]:
        probabilities = self.probabilities([example for _, example in rows], idempotency_key)
        names = self.label_names
        predictions = []
        for (row_id, example), p in zip(rows, probabilities, strict=True):
            gold = None if example.label is None else names[example.label]
            by_name = {name: round(float(v), 6) for name, v in zip(names, p, strict=True)}
            predictions.append(Prediction(row_id, names[int(p.argmax())], by_name, gold))
        return predictions

    def classify(self, texts: Any) -> list[Prediction]:
        """Predictions for texts given as strings, (text_a, text_b) pairs, dicts with text_a/text_b (and an
        optional label name), or a DataFrame-like table (anything with `to_dict("records")`); ids are the
        0-based positions. Batched to the server's limits, one call per batch."""
        return classify_texts(self, texts)

    def evaluate(self, split: str = "test", seed: int | None = None, test_size: Any = None,
                 data_dir: str | Path | None = None) -> float:  # fmt: skip
        """The prompt's metric on a split of its task (its calibration applied), as `lmaas eval` reports it."""
        from lmaas_client.tasks.data import load_split, load_test

        split_seed = seed if seed is not None else self.meta.get("seed", 42)
        examples = load_test(self.task, test_size, data_dir) if split == "test" else load_split(
            self.task, split, split_seed, data_dir)  # type: ignore[arg-type]  # fmt: skip
        return self.scorer.score(examples, [self.candidate], calibration=self.calibration)[0].metric

    def batch_key(self, rows: Sequence[Row], start: int) -> str:
        """The same rows at the same place under the same prompt: the same key, so a rerun replays."""
        digest = hashlib.sha256(self.fingerprint.encode())
        for row_id, example in rows:
            digest.update(json.dumps([row_id, example.text_a, example.text_b]).encode())
        return f"predict-{digest.hexdigest()[:32]}-{start}"


class DeployedPrompt:
    """A prompt deployed on the server, used by its id: `.classify(texts)`, `.delete()`, as `lmaas predict
    --deployed` uses it. Charged one call per text."""

    def __init__(self, client: LMaaSClient, prompt: str | PromptInfo):
        self.client = client
        self.info = prompt if isinstance(prompt, PromptInfo) else client.prompt(prompt)
        self.id = self.info.id
        self.calls = 0

    @property
    def label_names(self) -> list[str]:
        return list(self.info.labels)

    @property
    def max_batch(self) -> int:
        """Texts per request: the server's max_classify_texts."""
        return min(MAX_BATCH, self.client.model_info().limits.max_classify_texts or MAX_BATCH)

    def predict(self, rows: Sequence[Row], idempotency_key: str | None = None) -> list[Prediction]:
        texts = [ClassifyText(text_a=example.text_a, text_b=example.text_b) for _, example in rows]
        response = self.client.classify(self.id, texts, idempotency_key=idempotency_key)
        self.calls += response.usage.calls
        names = self.label_names
        return [Prediction(row_id, result.label, {name: round(result.probabilities[name], 6) for name in names},
                           None if example.label is None else names[example.label])
                for (row_id, example), result in zip(rows, response.results, strict=True)]  # fmt: skip

    def classify(self, texts: Any) -> list[Prediction]:
        """As `Predictor.classify`: strings, pairs, dicts or a DataFrame-like table, batched to the limits."""
        return classify_texts(self, texts)

    def batch_key(self, rows: Sequence[Row], start: int) -> str:
        digest = hashlib.sha256(self.id.encode())
        for row_id, example in rows:
            digest.update(json.dumps([row_id, example.text_a, example.text_b]).encode())
        return f"classify-{digest.hexdigest()[:32]}-{start}"

    def delete(self) -> None:
        self.client.delete_prompt(self.id)

    def check_rows(self, rows: Sequence[Row], source: Path | str) -> None:
        """Texts the server would refuse (empty, longer than its limit), named before any call."""
        limit = self.client.model_info().limits.max_classify_chars
        for row_id, example in rows:
            for name in ("text_a", "text_b"):
                value = getattr(example, name)
                if value is not None and not value.strip():
                    raise TaskError(f"{source}: row {row_id}: {name} is empty")
                if value is not None and limit is not None and len(value) > limit:
                    raise TaskError(f"{source}: row {row_id}: {name} is longer than the server's {limit} characters")


def classify_texts(predictor: Predictor | DeployedPrompt, texts: Any) -> list[Prediction]:
    """Predictions for texts given as strings, (text_a, text_b) pairs, dicts with text_a/text_b (and an optional
    label name), or a DataFrame-like table (anything with `to_dict("records")`); ids are the 0-based
    positions. Batched to the server's limits."""
    records = texts.to_dict("records") if hasattr(texts, "to_dict") else list(texts)
    rows = [(str(i), _example(record, predictor.label_names)) for i, record in enumerate(records)]
    size = predictor.max_batch
    return [p for start in range(0, len(rows), size) for p in predictor.predict(rows[start : start + size])]


def _example(record: Any, label_names: list[str]) -> Example:
    if isinstance(record, str):
        return Example(text_a=record)
    if isinstance(record, (tuple, list)):
        return Example(text_a=record[0], text_b=record[1] if len(record) > 1 else None)
    label = record.get("label")
    label_id = label_names.index(label) if isinstance(label, str) else label
    return Example(text_a=record["text_a"], text_b=record.get("text_b"), label=label_id)


@dataclass
class PredictSummary:
    rows: int
    written: int  # rows in the output file (from this and earlier runs)
    calls: int  # calls charged by this run
    accuracy: float | None  # over the rows with a label


def predict_file(
    predictor: Predictor | DeployedPrompt,
    rows: Sequence[Row],
    out: Path,
    batch_size: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> PredictSummary:
    """Classify `rows` into `out` (JSONL or CSV), continuing after the rows an earlier run already wrote."""
    writer = OutputFile(out, predictor.label_names)
    done = writer.finished_ids()
    expected = [row_id for row_id, _ in rows[: len(done)]]
    if done != expected:
        raise TaskError(f"{out}: holds predictions for other rows (first difference at row {len(done)}); "
                        "remove it or choose another --out")  # fmt: skip
    size = min(batch_size or MAX_BATCH, predictor.max_batch)
    for start in range(len(done), len(rows), size):
        batch = rows[start : start + size]
        writer.append(predictor.predict(batch, predictor.batch_key(batch, start)))
        if on_batch is not None:
            on_batch(start + len(batch))
    return PredictSummary(len(rows), len(rows), predictor.calls, writer.accuracy())


class OutputFile:
    """Predictions on disk, one row per line; only whole, flushed lines count as done."""

    def __init__(self, path: Path, label_names: list[str]):
        self.path = path
        self.format = OUTPUT_FORMATS.get(path.suffix.lower())
        if self.format is None:
            raise TaskError(f"{path}: the output must end in .jsonl or .csv")
        self.label_names = label_names
        self.columns = ["id", "label", *[f"p_{name}" for name in label_names], "gold"]

    def finished_ids(self) -> list[str]:
        """Ids already written; a torn last line (a crash mid-write) is cut off."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        whole = data[: data.rfind(b"\n") + 1]
        if len(whole) != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(len(whole))
        return [record["id"] for record in self._records(whole.decode("utf-8"))]

    def append(self, predictions: list[Prediction]) -> None:
        lines = io.StringIO()
        if self.format == "csv":
            writer = csv.writer(lines)
            if not self.path.exists() or self.path.stat().st_size == 0:
                writer.writerow(self.columns)
            for p in predictions:
                writer.writerow([p.id, p.label, *[p.probabilities[n] for n in self.label_names], p.gold or ""])
        else:
            lines.writelines(json.dumps(p.record(), ensure_ascii=False) + "\n" for p in predictions)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8", newline="") as handle:
            handle.write(lines.getvalue())
            handle.flush()
            os.fsync(handle.fileno())

    def accuracy(self) -> float | None:
        records = self._records(self.path.read_text(encoding="utf-8")) if self.path.exists() else []
        labelled = [r for r in records if r.get("gold")]
        return sum(r["label"] == r["gold"] for r in labelled) / len(labelled) if labelled else None

    def _records(self, text: str) -> list[dict[str, Any]]:
        if self.format == "jsonl":
            return [json.loads(line) for line in text.splitlines() if line.strip()]
        return list(csv.DictReader(io.StringIO(text, newline="")))
