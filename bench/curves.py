"""Accuracy-per-call curves and tables from run folders (`result.json` with a `--test-at` curve).

A series is a set of runs of one configuration over several seeds: `--series LABEL=ROOT:TAG`, where the runs
are ROOT/<task>/<TAG>-<seed>/result.json. At each call count every seed's test score counts (the selected
prompt scored on the full test set at that point, as a run with that budget would end); the manual prompt
and the calibrated manual prompt (when the runs recorded it) are drawn as flat lines.

    python bench/curves.py plot --task sst2 --series "BBT=bench/results/calib/smollm2:bbt" \\
        --series "BBT, calibrated=bench/results/calib/smollm2:bbt-cal" --out bench/results/curves/sst2.png
    python bench/curves.py plot ... --level "white-box prompt tuning=bench/results/calib/smollm2-bf16:prompt-tuning"
    python bench/curves.py table --at 300 --task sst2 --task agnews --series ...
    python bench/curves.py plot ... --series "default=ROOT:default500@ROOT/sst2-manual-floor-3seeds.json"

`@FLOOR_JSON` after a series reads its test points as the manual floor hands them over (a replay written by
`bench/manual_floor.py --json`): runs made before the floor was a default, drawn as that default ends.

Spread: mean ± standard deviation over seeds, and the binomial 95 % interval of the mean accuracy
(normal approximation over all seeds' test examples, 1.96 * sqrt(p (1 - p) / (seeds * test examples))).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never a window
import matplotlib.pyplot as plt


@dataclass
class Series:
    label: str
    root: Path
    tag: str
    floor: Path | None = None  # a `bench/manual_floor.py --json` report: the runs' curves with the manual floor

    @classmethod
    def parse(cls, text: str) -> Series:
        label, _, location = text.partition("=")
        location, _, floor = location.partition("@")
        root, _, tag = location.rpartition(":")
        if not (label and root and tag):
            raise argparse.ArgumentTypeError(f"--series {text!r}: expected LABEL=ROOT:TAG[@FLOOR_JSON]")
        return cls(label, Path(root), tag, Path(floor) if floor else None)

    def runs(self, task: str) -> list[dict]:
        paths = sorted(
            p
            for p in (self.root / task).glob(f"{self.tag}-*/result.json")
            if p.parent.name.removeprefix(f"{self.tag}-").isdigit()
        )  # "bbt-13", not "bbt-cal-13"
        runs = [json.loads(p.read_text()) for p in paths]
        runs = [r for r in runs if r.get("status", "completed") == "completed" or r.get("curve")]
        if self.floor is None:
            return runs
        replays = json.loads(self.floor.read_text())["runs"]  # read once for all the series' runs
        return [self._floored(r, replays) for r in runs]

    def _floored(self, run: dict, replays: dict) -> dict:
        """The run as it ends with the manual floor: each test point replaced by the replay's `floor_test`."""
        replayed = replays.get(f"{self.tag}-{run['seed']}")
        if replayed is None:
            raise SystemExit(f"{self.floor}: no replay of {self.tag}-{run['seed']}; run bench/manual_floor.py on it")
        floor = {p["calls"]: p["floor_test"] for p in replayed["points"]}
        curve = [{**p, "test_score": floor.get(p["calls"], p.get("test_score"))} for p in run["curve"]]
        return {**run, "curve": curve}


@dataclass
class Point:
    calls: int
    mean: float
    std: float
    half_interval: float  # binomial 95 % half-width of the mean
    seeds: int


def summarise(scores: list[float], test_size: int) -> tuple[float, float, float]:
    mean = statistics.mean(scores)
    std = statistics.stdev(scores) if len(scores) > 1 else 0.0
    half = 1.96 * math.sqrt(max(mean * (1 - mean), 1e-12) / (len(scores) * max(test_size, 1)))
    return mean, std, half


def curve(runs: list[dict]) -> list[Point]:
    """Mean test score per call count reached by every run (seeds that stopped earlier end the curve)."""
    per_run = [{p["calls"]: p["test_score"] for p in r["curve"] if p.get("test_score") is not None} for r in runs]
    if not per_run:
        return []
    common = sorted(set.intersection(*(set(points) for points in per_run)))
    size = runs[0]["test_size"]
    return [Point(c, *summarise([points[c] for points in per_run], size), len(per_run)) for c in common]


def baseline(runs: list[dict], key: str) -> tuple[float, float, float] | None:
    values = [r[key] for r in runs if r.get(key) is not None and not math.isnan(r[key])]
    return summarise(values, runs[0]["test_size"]) if values else None


def plot(args: argparse.Namespace) -> None:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    drawn_baselines = False
    for series in args.series:
        runs = series.runs(args.task)
        points = curve(runs)
        if not points:
            continue
        xs = [p.calls for p in points]
        means = [100 * p.mean for p in points]
        line = axis.plot(xs, means, marker="o", label=f"{series.label} (n={points[0].seeds})")[0]
        axis.fill_between(xs, [m - 100 * p.std for m, p in zip(means, points, strict=True)],
                          [m + 100 * p.std for m, p in zip(means, points, strict=True)],
                          color=line.get_color(), alpha=0.15)  # fmt: skip
        if not drawn_baselines:
            for key, label, style in (("manual_prompt_test_acc", "manual prompt", ":"),
                                      ("manual_calibrated_test_acc", "manual prompt, calibrated", "--")):  # fmt: skip
                value = baseline(runs, key)
                if value is not None:
                    axis.axhline(100 * value[0], color="grey", linestyle=style, label=label)
            drawn_baselines = True
    for series in args.level or []:  # a method that spends no search calls (white-box prompt tuning): its level
        runs = series.runs(args.task)
        value = baseline(runs, "test_acc") if runs else None
        if value is not None:
            axis.axhline(100 * value[0], color="black", linestyle="-.", label=f"{series.label} (no calls)")
    axis.set_xlabel("calls on the training set")
    axis.set_ylabel(f"test accuracy, % ({args.task})")
    axis.set_xscale("log")
    ticks = [25, 50, 100, 200, 300, 500, 1000]
    low, high = axis.get_xlim()
    axis.set_xticks([t for t in ticks if low <= t <= high], [str(t) for t in ticks if low <= t <= high])
    axis.minorticks_off()
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    axis.set_title(args.title or args.task)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


def cell(value: tuple[float, float, float] | Point | None) -> str:
    if value is None:
        return "–"
    mean, std, half = (value.mean, value.std, value.half_interval) if isinstance(value, Point) else value
    return f"{100 * mean:.1f} ± {100 * std:.1f} [±{100 * half:.1f}]"


def table(args: argparse.Namespace) -> None:
    """Markdown: per series and task, the test score at `--at` calls (mean ± std [95 % interval])."""
    print("| configuration | " + " | ".join(args.task) + " |")
    print("|---|" + "---|" * len(args.task))
    first = args.series[0]
    for key, label in (("manual_prompt_test_acc", "manual prompt"),
                       ("manual_calibrated_test_acc", "manual prompt, calibrated")):  # fmt: skip
        cells = [cell(baseline(first.runs(t), key)) if first.runs(t) else "–" for t in args.task]
        print(f"| {label} | " + " | ".join(cells) + " |")
    for series in args.series:
        cells = []
        for task in args.task:
            points = {p.calls: p for p in curve(series.runs(task))}
            cells.append(cell(points.get(args.at)) + (f" (n={points[args.at].seeds})" if args.at in points else ""))
        print(f"| {series.label} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    drawing = commands.add_parser("plot")
    drawing.add_argument("--task", required=True)
    drawing.add_argument("--out", type=Path, required=True)
    drawing.add_argument("--title")
    drawing.add_argument("--level", type=Series.parse, action="append", help="LABEL=ROOT:TAG drawn as a flat line")
    tabulating = commands.add_parser("table")
    tabulating.add_argument("--task", action="append", required=True)
    tabulating.add_argument("--at", type=int, required=True, help="call count")
    for sub in (drawing, tabulating):
        sub.add_argument("--series", type=Series.parse, action="append", required=True, help="LABEL=ROOT:TAG")
    args = parser.parse_args()
    plot(args) if args.command == "plot" else table(args)


if __name__ == "__main__":
    main()
