"""What finished runs would have handed over if the manual prompt had competed in their dev selection.

The "manual floor" scores the manual prompt on dev first (calibrated with its training-set bias when the run
calibrates: one training call and one dev call) and lets a tuned prompt replace it only when that prompt's dev
score is strictly higher. Selection by dev accuracy keeps the first prompt on ties, so a finished run's curve
(`dev_score`, `test_score` at each `--test-at` point) and the manual prompt's dev score are enough to replay it
exactly, without tuning again: at each point the run hands over the manual prompt when its dev score is at
least the selected prompt's, else the selected prompt.

    python bench/manual_floor.py --server http://127.0.0.1:8000 --root bench/results/calib/smollm2 \\
        --task sst2 --tags bbt,bbt-cal --json bench/results/calib/smollm2/sst2-manual-floor.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from lmaas_client import LMaaSClient
from lmaas_client.evaluation import NO_PROMPT, TaskScorer
from lmaas_client.tasks import get_task
from lmaas_client.tasks.data import load_task_data


def manual_dev(scorer: TaskScorer, task, seed: int, calibrate: bool) -> float:
    """The manual prompt's dev metric for split `seed` (after its training-set bias when `calibrate`)."""
    data = load_task_data(task, seed)
    calibration = scorer.score(data.train, [NO_PROMPT], calibrate=True)[0].calibration if calibrate else None
    return scorer.score(data.dev, [NO_PROMPT], calibration=calibration)[0].metric


def replay(result: dict, manual_dev_score: float, manual_test: float) -> list[dict]:
    """The curve's test points with and without the floor."""
    points = []
    for point in result["curve"]:
        if point.get("test_score") is None:
            continue
        floored = point["dev_score"] is None or manual_dev_score >= point["dev_score"]
        points.append({"calls": point["calls"], "test": point["test_score"], "dev": point["dev_score"],
                       "floor_test": manual_test if floored else point["test_score"], "manual_kept": floored})  # fmt: skip
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--task", required=True)
    parser.add_argument("--tags", required=True)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    task = get_task(args.task)
    report: dict = {"task": args.task, "runs": {}}
    with LMaaSClient(args.server) as client:
        for tag in args.tags.split(","):
            for path in sorted((args.root / args.task).glob(f"{tag}-[0-9]*/result.json")):
                result = json.loads(path.read_text())
                calibrate = bool(result["config"].get("calibrate"))
                scorer = TaskScorer(client, task, result["config"]["placement"])
                dev = manual_dev(scorer, task, result["seed"], calibrate)
                manual_test = result["manual_calibrated_test_acc"] if calibrate else result["manual_prompt_test_acc"]
                report["runs"][f"{tag}-{result['seed']}"] = {
                    "manual_dev": dev, "manual_test": manual_test, "points": replay(result, dev, manual_test)}  # fmt: skip
                print(path.parent.name, f"manual dev {dev:.3f}", report["runs"][f"{tag}-{result['seed']}"]["points"])
    print(table(report, args.tags.split(",")))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def spread(values: list[float]) -> str:
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.1f}"


def table(report: dict, tags: list[str]) -> str:
    lines = ["| configuration | calls | without floor | with manual floor | runs keeping the manual prompt |",
             "|---|---|---|---|---|"]  # fmt: skip
    for tag in tags:
        runs = [r for name, r in report["runs"].items() if name.rsplit("-", 1)[0] == tag]
        for i, point in enumerate(runs[0]["points"] if runs else []):
            plain = [100 * r["points"][i]["test"] for r in runs]
            floor = [100 * r["points"][i]["floor_test"] for r in runs]
            kept = sum(r["points"][i]["manual_kept"] for r in runs)
            lines.append(f"| {tag} | {point['calls']} | {spread(plain)} | {spread(floor)} | {kept}/{len(runs)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
