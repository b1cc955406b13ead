"""The Python API: tune, load a saved prompt, classify texts and tables, evaluate; task and seed given once."""

from __future__ import annotations

from lmaas_client import LMaaSClient, load_prompt, tune
from tests.client.test_runner_cli import DATA


class Table:
    """DataFrame-like: what `classify` needs of a pandas DataFrame."""

    def __init__(self, records: list[dict]):
        self.records = records

    def to_dict(self, orient: str) -> list[dict]:
        assert orient == "records"
        return self.records


def test_tune_then_classify_and_evaluate_from_python(live_server, tmp_path, monkeypatch):
    with live_server() as server:
        monkeypatch.setenv("LMAAS_SERVER", server.url)  # as the CLI: server and key from the environment
        run = tune("sst2", budget=6, seed=13, out=tmp_path / "run", popsize=3, prompt_length=2, intrinsic_dim=8,
                   test_size=16, eval_every=3, data_dir=DATA, placement="suffix")  # fmt: skip
        in_memory = tune("sst2", budget=3, seed=21, popsize=3, prompt_length=2, intrinsic_dim=8, test_size=16,
                         data_dir=DATA)  # fmt: skip
        prompt = load_prompt(tmp_path / "run" / "prompt.npz")
        texts = prompt.classify(["a moving, funny film", "dull from start to end"])
        pairs = prompt.classify(Table([{"text_a": "a moving, funny film", "label": "positive"}]))
        on_test = prompt.evaluate("test", test_size=16, data_dir=DATA)
        with LMaaSClient(server.url) as client:
            same = load_prompt(tmp_path / "run" / "prompt.npz", client=client).classify(["a moving, funny film"])
    result = run.result
    assert result.seed == 13 and result.config["seed"] == 13  # the seed given once reaches the tuner too
    assert result.calls_used == 6 and (tmp_path / "run" / "result.json").is_file() and run.best_prompt is not None
    assert in_memory.folder is None and in_memory.result.seed == 21 and in_memory.result.config["seed"] == 21
    assert [p.id for p in texts] == ["0", "1"] and {p.label for p in texts} <= {"negative", "positive"}
    assert pairs[0].gold == "positive" and pairs[0].probabilities == texts[0].probabilities
    assert same[0].probabilities == texts[0].probabilities
    assert on_test == result.test_acc  # what the run reported on the same 16 test examples


def test_the_python_api_does_not_switch_a_notebooks_matplotlib_backend(live_server, tmp_path, monkeypatch):
    import matplotlib

    before = matplotlib.get_backend()
    matplotlib.use("pdf")  # a notebook's own backend
    try:
        with live_server() as server:
            tune("sst2", budget=3, seed=13, out=tmp_path / "run", server=server.url, popsize=3, prompt_length=2,
                 intrinsic_dim=8, test_size=16, data_dir=DATA)  # fmt: skip
        assert (tmp_path / "run" / "curve.png").is_file()
        assert matplotlib.get_backend() == "pdf"  # unchanged
    finally:
        matplotlib.use(before)
