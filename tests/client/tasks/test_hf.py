"""Tasks from Hugging Face `datasets`: datasets built in the test, saved with save_to_disk and read offline."""

from __future__ import annotations

import csv
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmaas_client.tasks import TaskError
from lmaas_client.tasks.data import load_split, load_task_data
from lmaas_client.tasks.files import load_task_file, save_task_file, task_file_settings, user_task
from lmaas_client.tasks.hf import DatasetRef, hf_task, parse_hf_task
from tests.conftest import REPO

datasets = pytest.importorskip("datasets")
datasets.disable_progress_bars()

NAMES = ["negative", "positive"]
WORDS = [" bad", " great"]
TEMPLATE = "Review: {text_a}\nSentiment:{mask}"
SETTINGS = {"templates": TEMPLATE, "label_words": WORDS}


def reviews(count: int, offset: int = 0) -> dict[str, list]:
    # labels cycle 0, 1, 1: unbalanced classes, so a per-class draw is visible
    return {
        "text": [f"review number {offset + i}" for i in range(count)],
        "label": [min(i % 3, 1) for i in range(count)],
    }


def dataset(columns: dict[str, list], label=None):
    data = datasets.Dataset.from_dict(columns)
    return data.cast_column("label", label) if label is not None else data


def saved(tmp_path: Path, train: dict, test: dict, label=None, name: str = "reviews") -> Path:
    folder = tmp_path / name
    datasets.DatasetDict({"train": dataset(train, label), "test": dataset(test, label)}).save_to_disk(str(folder))
    return folder


@pytest.fixture
def folder(tmp_path) -> Path:
    return saved(tmp_path, reviews(60), reviews(9, 1000), datasets.ClassLabel(names=NAMES))


def error(function, *args, **kwargs) -> str:
    with pytest.raises(TaskError) as caught:
        function(*args, **kwargs)
    return str(caught.value)


def test_a_saved_dataset_gives_k_per_class_train_and_dev_drawn_by_seed(folder):
    spec = hf_task("reviews", path=folder, shots=4, **SETTINGS)
    assert spec.label_names == tuple(NAMES)  # from the ClassLabel
    assert spec.templates["causal"]["prefix"] == "{prompt}" + TEMPLATE
    data = load_task_data(spec, seed=13)
    for split in (data.train, data.dev):
        assert [e.label for e in split] == [0] * 4 + [1] * 4  # k per class, class by class
    assert not {e.text_a for e in data.train} & {e.text_a for e in data.dev}
    assert len(data.test) == 9 and data.test[0].text_a == "review number 1000"  # the test split, whole, in order
    assert load_split(spec, "train", 13) == data.train  # the same seed draws the same split
    assert load_split(spec, "train", 21) != data.train  # another seed another


def test_the_draw_matches_the_recipe_for_user_files(tmp_path, folder):
    """examples/yelp/README.md's recipe writes CSV files; the dataset task draws the very same examples."""
    train = reviews(60)
    by_class: dict[int, list[str]] = {0: [], 1: []}
    for text, label in zip(train["text"], train["label"], strict=True):
        by_class[label].append(text)
    for seed in (13, 42):
        rng = random.Random(seed)
        picked = {label: rng.sample(texts, 8) for label, texts in by_class.items()}
        for split, part in (("train", slice(None, 4)), ("dev", slice(4, None))):
            path = tmp_path / f"16-{seed}" / f"{split}.csv"
            path.parent.mkdir(exist_ok=True)
            with path.open("w", newline="", encoding="utf-8") as handle:
                csv.writer(handle).writerows([["label", "text"]] + [[lb, t] for lb in (0, 1) for t in picked[lb][part]])
    files = user_task("files", train="16-{seed}/train.csv", dev="16-{seed}/dev.csv", test="16-13/dev.csv",
                      seeds=[13, 42], label_names=NAMES, text_a="text", base_dir=tmp_path, **SETTINGS)  # fmt: skip
    drawn = hf_task("drawn", path=folder, shots=4, **SETTINGS)
    for seed in (13, 42):
        for split in ("train", "dev"):
            assert load_split(drawn, split, seed) == load_split(files, split, seed)


def test_a_task_file_with_a_dataset_table_round_trips(tmp_path, folder):
    task = tmp_path / "task.toml"
    task.write_text(
        'name = "reviews"\nlabel_words = [" bad", " great"]\ntemplates = "Review: {text_a}\\nSentiment:{mask}"\n'
        f'quick_test_size = 4\n[dataset]\npath = "{folder.name}"\nshots = 3\n[columns]\ntext_a = "text"\nlabel = "label"\n'
    )
    spec = load_task_file(task)  # the path is relative to the task file
    data = load_task_data(spec, seed=42)
    assert (len(data.train), len(data.dev), len(data.test), data.test_full_size) == (6, 6, 4, 9)
    settings = task_file_settings(spec)
    assert settings["dataset"] == {"path": str(folder.resolve()), "train": "train", "test": "test", "shots": 3}
    (tmp_path / "elsewhere").mkdir()
    again = load_task_file(save_task_file(spec, tmp_path / "elsewhere" / "task.json"))
    assert load_task_data(again, seed=42) == data
    # [files] and [dataset] together, and seeds (every seed draws its own split), are refused
    task.write_text(task.read_text().replace("[dataset]", "seeds = [13]\n[dataset]"))
    assert "drop 'seeds'" in error(load_task_file, task)


def test_plain_label_columns_need_label_names_and_may_map_values(tmp_path):
    strings = {"text": reviews(12)["text"], "label": ["pos" if y else "neg" for y in reviews(12)["label"]]}
    folder = saved(tmp_path, strings, strings, name="strings")
    assert "give label_names" in error(hf_task, "s", path=folder, shots=2, text_a="text", **SETTINGS)
    spec = hf_task("s", path=folder, shots=2, label_names=["neg", "pos"], **SETTINGS)
    assert [e.label for e in load_split(spec, "train", 1)] == [0, 0, 1, 1]
    stars = {"text": reviews(12)["text"], "label": [5 if y else 1 for y in reviews(12)["label"]]}
    spec = hf_task("stars", path=saved(tmp_path, stars, stars, name="stars"), shots=2, label_names=NAMES,
                   label_values=["1", "5"], **SETTINGS)  # fmt: skip
    assert [e.label for e in load_split(spec, "dev", 1)] == [0, 0, 1, 1]
    renamed = hf_task("r", path=saved(tmp_path, reviews(12), reviews(3), datasets.ClassLabel(names=["n", "p"]),
                                      name="renamed"), shots=2, label_names=NAMES, **SETTINGS)  # fmt: skip
    assert renamed.label_names == tuple(NAMES)


def test_bad_datasets_get_errors_naming_the_column_split_and_row(tmp_path, folder):
    def fails(*needles: str, **kwargs) -> None:
        message = error(hf_task, "bad", **{"path": folder, "shots": 2, **SETTINGS, **kwargs})
        assert all(n in message for n in needles), message

    fails("no column 'review' for text_a", "available columns: 'text', 'label'", text_a="review")
    fails("no column 'stars' for label", label="stars")
    fails("column 'label' (text_b) must hold text", text_b="label")
    fails("has 20 examples; shots = 11 draws 22", "'negative'", shots=11)
    fails("give 2 names", label_names=["a", "b", "c"])
    fails("no split 'validation'", "splits: train, test", test_split="validation")
    fails("exactly one", path=None)
    floats = {"text": ["a", "b", "c", "d"], "label": [0.5, 1.0, 0.0, 1.0]}
    fails("label column 'label' holds Value('float64')", "a ClassLabel, integers or strings",
          path=saved(tmp_path, floats, floats, name="floats"), label_names=NAMES)  # fmt: skip
    unlabelled = reviews(3, 500) | {"label": [-1, -1, -1]}
    fails("split 'test', row 0", "no label (-1", "test = \"validation\"",
          path=saved(tmp_path, reviews(12), unlabelled, name="unlabelled"), label_names=NAMES)  # fmt: skip
    empty = reviews(12) | {"text": [""] * 12}
    with pytest.raises(TaskError, match=r"split 'train', row \d+: empty text in column 'text'"):
        load_split(hf_task("e", path=saved(tmp_path, empty, reviews(3), name="empty"), shots=2, label_names=NAMES,
                           **SETTINGS), "train", 1)  # fmt: skip
    datasets.Dataset.from_dict(reviews(12)).save_to_disk(str(tmp_path / "one"))
    fails("holds a single split", path=tmp_path / "one", label_names=NAMES)
    fails("no such folder", path=tmp_path / "nothing")


def test_a_hub_dataset_is_loaded_by_name_config_split_and_revision(monkeypatch):
    calls = []

    def load_dataset(name, config, split, revision):  # no hub here: the library's answer for these arguments
        calls.append((name, config, split, revision))
        if split == "missing":
            raise ValueError('Unknown split "missing". Should be one of [train, test].')
        return dataset(reviews(12), datasets.ClassLabel(names=NAMES))

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    spec = hf_task("hub", dataset="someone/reviews", config="plain", revision="v1", shots=2, **SETTINGS)
    assert calls == [("someone/reviews", "plain", "train", "v1"), ("someone/reviews", "plain", "test", "v1")]
    assert task_file_settings(spec)["dataset"] == {"name": "someone/reviews", "config": "plain", "revision": "v1",
                                                   "train": "train", "test": "test", "shots": 2}  # fmt: skip
    message = error(hf_task, "hub", dataset="someone/reviews", test_split="missing", **SETTINGS)
    assert "cannot load split 'missing' of dataset someone/reviews" in message and "Unknown split" in message


def test_hf_task_references(tmp_path, folder, monkeypatch):
    assert parse_hf_task("hf:fancyzhx/yelp_polarity") == ("hf-yelp_polarity", DatasetRef(name="fancyzhx/yelp_polarity"))
    assert parse_hf_task("hf:glue:sst2") == ("hf-glue.sst2", DatasetRef(name="glue", config="sst2"))
    monkeypatch.chdir(tmp_path)
    assert parse_hf_task(f"hf:{folder.name}") == ("hf-reviews", DatasetRef(path=str(folder.resolve())))
    with pytest.raises(TaskError, match="name a dataset"):
        parse_hf_task("hf:")


def test_cli_builds_the_dataset_task_before_any_call(folder):
    flags = ["--text-a", "text", "--label-word", " bad", "--label-word", " great", "--template", TEMPLATE]
    from lmaas_client.cli import app

    # the server does not exist: a bad column is reported first, a good task fails only at the connection
    bad = CliRunner().invoke(app, ["tune", "--out", str(folder.parent / "run"), "--server", "http://127.0.0.1:9",
                                   "--task", f"hf:{folder}", *flags[:1], "review", *flags[2:]])  # fmt: skip
    assert bad.exit_code == 1 and "no column 'review' for text_a" in bad.output, bad.output
    missing = CliRunner().invoke(app, ["tune", "--out", str(folder.parent / "run"), "--task", f"hf:{folder}"])
    assert missing.exit_code == 1 and "--label-word" in missing.output


def test_importing_the_client_does_not_import_datasets():
    script = "import sys, lmaas_client, lmaas_client.cli, lmaas_client.tasks.hf; print('datasets' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "False"


def test_cli_tunes_on_a_saved_dataset_and_the_run_folder_keeps_the_task(live_server, folder, tmp_path, monkeypatch):
    from lmaas_client.cli import app

    monkeypatch.setenv("LMAAS_NO_PROGRESS", "1")
    out = tmp_path / "run"
    with live_server("llama") as server:
        tuned = CliRunner().invoke(app, ["tune", "--out", str(out), "--server", server.url, "--task", f"hf:{folder}",
                                         "--method", "manual", "--budget", "1", "--hf-shots", "2", "--text-a", "text",
                                         "--label-word", " bad", "--label-word", " great", "--template", TEMPLATE])  # fmt: skip
        assert tuned.exit_code == 0, tuned.output
        evaluated = CliRunner().invoke(app, ["eval", "--prompt", str(out / "prompt.npz"), "--split", "dev",
                                             "--server", server.url])  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["examples"] == 4  # 2 per class, drawn again from the saved task
    task = json.loads((out / "task.json").read_text())
    assert task["name"] == "hf-reviews" and task["dataset"]["shots"] == 2 and task["label_names"] == NAMES
    assert json.loads((out / "result.json").read_text())["test_size"] == 9


def test_the_python_api_tunes_a_dataset_task_given_once(live_server, folder, tmp_path):
    from lmaas_client import hf_task as exported
    from lmaas_client import tune

    spec = exported("reviews", path=folder, shots=2, text_a="text", **SETTINGS)
    with live_server("llama") as server:
        run = tune(spec, method="manual", budget=1, seed=21, out=tmp_path / "run", server=server.url)
    assert run.result.task == "reviews" and run.result.test_size == 9
    assert json.loads((tmp_path / "run" / "task.json").read_text())["dataset"]["path"] == str(folder.resolve())
