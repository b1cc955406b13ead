"""`lmaas predict`: classify new texts with a saved prompt, resumably, against a real HTTP server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmaas_client import LMaaSClient
from lmaas_client.evaluation import TaskScorer
from lmaas_client.predict import Predictor, predict_file
from lmaas_client.prompt_io import save_prompt
from lmaas_client.prompts import PromptCandidate
from lmaas_client.tasks import TaskError, get_task
from lmaas_client.tasks.readers import read_rows
from tests.client.test_runner_cli import assert_clean_failure, cli

TEXTS = ["a great film", "dull and slow", "wonderful acting", "a waste of time", "loved it", "boring",
         "brilliant", "awful plot", "fine work", "terrible"]  # fmt: skip


def write_prompt(client: LMaaSClient, path: Path, **meta) -> Path:
    info = client.model_info()
    soft = np.random.default_rng(0).normal(0, info.embedding_std, (2, info.hidden_size)).astype(np.float32)
    template = TaskScorer(client, get_task("sst2"), "suffix").template
    save_prompt(path, PromptCandidate(soft=soft), {"task": "sst2", "template": template, "model": info.name,
                                                   "family": info.family, "placement": "suffix", **meta})  # fmt: skip
    return path


def write_input(path: Path, labelled: bool = True) -> Path:
    rows = [{"text_a": t, **({"label": "positive" if i % 2 == 0 else "negative"} if labelled else {})}
            for i, t in enumerate(TEXTS)]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_predict_writes_a_label_and_probabilities_per_row_and_reports_accuracy(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        prompt = write_prompt(client, tmp_path / "prompt.npz")
        result = cli("predict", "--prompt", str(prompt), "--input", str(write_input(tmp_path / "in.jsonl")),
                     "--out", str(tmp_path / "out.jsonl"), "--server", server.url, "--batch-size", "4")  # fmt: skip
        used = server.server.config.app.state.budget.used
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records] == [str(i) for i in range(1, 11)]
    assert all(r["label"] in ("negative", "positive") for r in records)
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in records)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in records)
    accuracy = sum(r["label"] == r["gold"] for r in records) / 10
    assert f"accuracy {accuracy:.4f}" in " ".join(result.output.split()) and used == 3  # 10 rows, batches of 4


def test_an_interrupted_prediction_continues_without_buying_finished_rows_again(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        predictor = Predictor(client, write_prompt(client, tmp_path / "prompt.npz"))
        rows = read_rows(write_input(tmp_path / "in.jsonl", labelled=False), {"text_a": "text_a"}, ["n", "p"])
        whole = tmp_path / "whole.csv"
        predict_file(predictor, rows, whole, batch_size=4)
        lines = whole.read_text().splitlines(keepends=True)  # header + 10 rows
        partial = tmp_path / "partial.csv"
        partial.write_text("".join(lines[:5]) + lines[5][:7])  # 4 rows done, the 5th torn by a crash
        budget = server.server.config.app.state.budget
        before = budget.used
        summary = predict_file(predictor, rows, partial, batch_size=4)
        charged = budget.used - before
    assert partial.read_text() == whole.read_text()
    assert charged == 2 and summary.accuracy is None  # rows 5-8 and 9-10 only; no labels, no accuracy


def test_calibration_saved_with_the_prompt_is_applied(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        plain = Predictor(client, write_prompt(client, tmp_path / "plain.npz"))
        biased = Predictor(client, write_prompt(client, tmp_path / "biased.npz",
                                                calibration={"bias": [50.0, -50.0], "scale": 1.0}))  # fmt: skip
        rows = read_rows(write_input(tmp_path / "in.jsonl"), {"text_a": "text_a", "label": "label"}, plain.label_names)
        assert {p.label for p in biased.predict(rows)} == {"negative"}
        assert [p.gold for p in plain.predict(rows)] == ["positive", "negative"] * 5


def test_batch_keys_replay_the_same_rows_and_differ_for_others(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        predictor = Predictor(client, write_prompt(client, tmp_path / "prompt.npz"))
    rows = read_rows(write_input(tmp_path / "in.jsonl"), {"text_a": "text_a"}, ["negative", "positive"])
    assert predictor.batch_key(rows[:4], 0) == predictor.batch_key(rows[:4], 0)
    assert (
        len({predictor.batch_key(rows[:4], 0), predictor.batch_key(rows[4:8], 4), predictor.batch_key(rows[:4], 4)})
        == 3
    )
    assert len(predictor.batch_key(rows, 0)) <= 128  # the server's limit on Idempotency-Key


def test_a_prompt_tuned_on_another_model_is_refused(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        prompt = write_prompt(client, tmp_path / "prompt.npz", model="another/model")
        with pytest.raises(TaskError, match="tuned on another/model"):
            Predictor(client, prompt)


@pytest.mark.parametrize(
    ("content", "name", "needle"),
    [
        ('{"text_a": "fine"}\n{"text": "x"}\n', "in.jsonl", ("in.jsonl:2:", "no column 'text_a'")),
        ('{"text_a": "fine", "label": "positive"}\n{"text_a": "x", "label": "maybe"}\n', "in.jsonl",
         ("in.jsonl:2:", "unknown label 'maybe'")),
        ("text_a,label\nfine,positive\n\"broken,negative\n", "in.csv", ("in.csv:3:", "malformed CSV row")),
        ('{"text_a": "a", "id": 1}\n{"text_a": "b", "id": 1}\n', "in.jsonl", ("in.jsonl:2:", "id '1' appears twice")),
        ("text_a\nfine\n", "in.txt", ("in.txt", "cannot tell the format")),
    ],
)  # fmt: skip
def test_bad_input_files_are_named_with_their_line_before_any_call(live_server, tmp_path, content, name, needle):
    path = tmp_path / name
    path.write_text(content)
    with live_server() as server, LMaaSClient(server.url) as client:
        prompt = write_prompt(client, tmp_path / "prompt.npz")
        result = cli("predict", "--prompt", str(prompt), "--input", str(path), "--out", str(tmp_path / "o.jsonl"),
                     "--server", server.url)  # fmt: skip
        used = server.server.config.app.state.budget.used
    output = " ".join(assert_clean_failure(result).split())  # rich wraps long paths at the terminal's width
    assert all(part in output for part in needle), output
    assert used == 0 and not (tmp_path / "o.jsonl").exists()


def test_budget_running_out_keeps_the_finished_rows_and_exits_3(live_server, tmp_path):
    with live_server("llama", budget=2) as server, LMaaSClient(server.url) as client:
        prompt = write_prompt(client, tmp_path / "prompt.npz")
        result = cli("predict", "--prompt", str(prompt), "--input", str(write_input(tmp_path / "in.jsonl")),
                     "--out", str(tmp_path / "out.jsonl"), "--server", server.url, "--batch-size", "4")  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "8/10 rows" in " ".join(result.output.split())
    assert len((tmp_path / "out.jsonl").read_text().splitlines()) == 8
