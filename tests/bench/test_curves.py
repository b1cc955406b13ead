"""`bench/curves.py` tables from run folders: seeds averaged per call count, and `@FLOOR_JSON` series read as
the manual floor replay hands them over (runs made before the floor was a default)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def write_run(root, tag: str, seed: int, scores: dict[int, float]) -> None:
    folder = root / "sst2" / f"{tag}-{seed}"
    folder.mkdir(parents=True)
    curve = [{"calls": c, "dev_score": 0.5, "test_score": s} for c, s in scores.items()]
    result = {"seed": seed, "test_size": 100, "status": "completed", "curve": curve,
              "manual_prompt_test_acc": 0.7, "manual_calibrated_test_acc": 0.8}  # fmt: skip
    (folder / "result.json").write_text(json.dumps(result))


def table(*series: str, check: bool = True) -> subprocess.CompletedProcess:
    args = [sys.executable, str(REPO / "bench" / "curves.py"), "table", "--task", "sst2", "--at", "100"]
    for text in series:
        args += ["--series", text]
    return subprocess.run(args, capture_output=True, text=True, timeout=60, check=check)


def test_a_floor_replay_replaces_the_test_points_it_kept_the_manual_prompt_at(tmp_path):
    write_run(tmp_path, "bbt", 13, {50: 0.60, 100: 0.70})
    write_run(tmp_path, "bbt", 42, {50: 0.62, 100: 0.90})
    replay = {
        "runs": {
            "bbt-13": {"points": [{"calls": 50, "floor_test": 0.8}, {"calls": 100, "floor_test": 0.8}]},
            "bbt-42": {"points": [{"calls": 50, "floor_test": 0.8}, {"calls": 100, "floor_test": 0.9}]},
        }
    }
    (tmp_path / "floor.json").write_text(json.dumps(replay))
    out = table(f"plain={tmp_path}:bbt", f"floored={tmp_path}:bbt@{tmp_path / 'floor.json'}").stdout
    assert "| plain | 80.0 ± 14.1" in out  # (70 + 90) / 2, two seeds
    assert "| floored | 85.0 ± 7.1" in out  # seed 13 keeps the manual prompt (80), seed 42 its tuned one (90)
    assert "| manual prompt, calibrated | 80.0" in out


def test_a_floor_replay_missing_a_run_is_refused_by_name(tmp_path):
    write_run(tmp_path, "bbt", 13, {100: 0.7})
    (tmp_path / "floor.json").write_text(json.dumps({"runs": {}}))
    done = table(f"x={tmp_path}:bbt@{tmp_path / 'floor.json'}", check=False)
    assert done.returncode != 0 and "no replay of bbt-13" in done.stderr
