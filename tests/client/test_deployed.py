"""Prompts deployed on the server from the client: `lmaas deploy`, `lmaas prompts`, `lmaas predict --deployed`
and the Python API, against a real HTTP server (without keys: its deployed prompts live in memory)."""

from __future__ import annotations

import json

import pytest

from lmaas_client import DeployedPrompt, LMaaSClient, NotFoundError, load_deployed, load_prompt
from lmaas_client.predict import predict_file
from lmaas_client.tasks.readers import read_rows
from tests.client.test_predict import write_input, write_prompt
from tests.client.test_runner_cli import assert_clean_failure, cli


def records(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_deploy_then_predict_deployed_gives_what_predict_gives(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        prompt = write_prompt(client, tmp_path / "prompt.npz", calibration={"bias": [0.2, -0.2], "scale": 1.0})
        data = write_input(tmp_path / "in.jsonl")
        common = ["--input", str(data), "--server", server.url, "--batch-size", "4"]
        assert cli("predict", "--prompt", str(prompt), "--out", str(tmp_path / "local.jsonl"), *common).exit_code == 0
        deployed = cli("deploy", str(prompt), "--server", server.url, "--name", "reviews")
        prompt_id = deployed.stdout.strip().splitlines()[-1]
        budget = server.server.config.app.state.budget
        before = budget.used
        result = cli("predict", "--deployed", prompt_id, "--out", str(tmp_path / "served.jsonl"), *common)
        charged = budget.used - before
        listed = cli("prompts", "list", "--server", server.url)
    assert deployed.exit_code == 0 and prompt_id.startswith("pr_"), deployed.output
    assert result.exit_code == 0, result.output
    local, served = records(tmp_path / "local.jsonl"), records(tmp_path / "served.jsonl")
    assert [(r["id"], r["label"], r["gold"]) for r in served] == [(r["id"], r["label"], r["gold"]) for r in local]
    for mine, theirs in zip(served, local, strict=True):
        assert mine["probabilities"] == pytest.approx(theirs["probabilities"], abs=2e-6)
    assert charged == 10  # one call per text (predict --prompt: one per batch)
    assert prompt_id in listed.stdout and "reviews" in listed.stdout and "negative, positive" in listed.stdout


def test_an_interrupted_deployed_prediction_continues_and_pays_only_the_rest(live_server, tmp_path):
    with live_server() as server, LMaaSClient(server.url) as client:
        deployed = load_prompt(write_prompt(client, tmp_path / "prompt.npz"), client=client).deploy()
        rows = read_rows(write_input(tmp_path / "in.jsonl"), {"text_a": "text_a", "label": "label"},
                         deployed.label_names)  # fmt: skip
        whole = tmp_path / "whole.jsonl"
        predict_file(deployed, rows, whole, batch_size=4)
        lines = whole.read_text().splitlines(keepends=True)
        partial = tmp_path / "partial.jsonl"
        partial.write_text("".join(lines[:6]) + lines[6][:9])  # 6 rows done, the 7th torn
        budget = server.server.config.app.state.budget
        before = budget.used
        summary = predict_file(DeployedPrompt(client, deployed.id), rows, partial, batch_size=4)
        charged = budget.used - before
    assert partial.read_text() == whole.read_text()
    assert charged == 4 and summary.calls == 4  # rows 7-10 only
    assert summary.accuracy == sum(r["label"] == r["gold"] for r in records(whole)) / 10


def test_budget_running_out_exits_3_and_keeps_the_finished_rows(live_server, tmp_path):
    with live_server("llama", budget=6) as server, LMaaSClient(server.url) as client:
        prompt_id = load_prompt(write_prompt(client, tmp_path / "prompt.npz"), client=client).deploy().id
        result = cli("predict", "--deployed", prompt_id, "--input", str(write_input(tmp_path / "in.jsonl")),
                     "--out", str(tmp_path / "out.jsonl"), "--server", server.url, "--batch-size", "4")  # fmt: skip
    assert result.exit_code == 3, result.output
    assert "4/10 rows" in " ".join(result.output.split())  # 4 calls, then 4 more do not fit in the 2 left
    assert len(records(tmp_path / "out.jsonl")) == 4


def test_the_python_api_deploys_classifies_and_deletes(live_server, tmp_path):
    texts = ["a moving, funny film", "dull from start to end", ("a pair", "is ignored by sst2")]
    with live_server() as server, LMaaSClient(server.url) as client:
        prompt = load_prompt(write_prompt(client, tmp_path / "prompt.npz"), client=client)
        deployed = prompt.deploy("reviews")
        again = prompt.deploy("reviews")
        by_id = load_deployed(deployed.id, server=server.url)
        served, local = by_id.classify(texts), prompt.classify(texts)
        assert [p.id for p in client.prompts()] == [deployed.id]
        by_id.delete()
        with pytest.raises(NotFoundError):
            load_deployed(deployed.id, client=client)
        by_id.client.close()
    assert again.id == deployed.id and deployed.info.name == "reviews" and deployed.label_names == prompt.label_names
    assert [p.label for p in served] == [p.label for p in local] and [p.id for p in served] == ["0", "1", "2"]


def test_bad_rows_and_ids_are_reported_before_any_call(live_server, tmp_path):
    blank, long = tmp_path / "blank.jsonl", tmp_path / "long.jsonl"
    blank.write_text('{"text_a": "fine"}\n{"text_a": "  "}\n')
    long.write_text('{"text_a": "fine"}\n{"text_a": "longer than twenty characters"}\n')
    with live_server("llama", max_classify_chars=20) as server, LMaaSClient(server.url) as client:
        prompt_id = load_prompt(write_prompt(client, tmp_path / "prompt.npz"), client=client).deploy().id
        out = ["--out", str(tmp_path / "o.jsonl"), "--server", server.url]
        empty = cli("predict", "--deployed", prompt_id, "--input", str(blank), *out)
        too_long = cli("predict", "--deployed", prompt_id, "--input", str(long), *out)
        unknown = cli("predict", "--deployed", "pr_" + "0" * 32, "--input", str(long), *out)
        both = cli("predict", "--deployed", prompt_id, "--prompt", str(tmp_path / "prompt.npz"), "--input", str(long),
                   *out)  # fmt: skip
        deleted = cli("prompts", "delete", prompt_id, "--server", server.url)
        used = server.server.config.app.state.budget.used
    assert "blank.jsonl:2: empty text" in " ".join(assert_clean_failure(empty).split())
    assert "long.jsonl: row 2: text_a is longer than the server's 20 characters" in " ".join(
        assert_clean_failure(too_long).split())  # fmt: skip
    assert "no deployed prompt" in " ".join(assert_clean_failure(unknown).split())
    assert both.exit_code == 2 and "either --prompt FILE or" in assert_clean_failure(both)  # a usage error
    assert deleted.exit_code == 0 and used == 0 and not (tmp_path / "o.jsonl").exists()
