"""Issue 4's results table: every method and baseline, several tasks and seeds, through the real API.

Each run is one `lmaas tune` process against one `lmaas-server` (started here on the default model unless
`--server` names one), so the numbers include everything a user pays for: HTTP, metering, the runner's
manual-prompt, dev and test scoring. Finished runs (their `result.json`) are skipped and a stopped run is
resumed from its checkpoint, so the script can be stopped and started again.

    python bench/bench_methods.py run --tasks sst2,agnews,rte --seeds 13,42,100 --budget 100
    python bench/bench_methods.py table --out bench/results/methods    # Markdown for BENCHMARKS.md

Method settings for a small CPU budget (all: prompt after the text, so causal LMs reuse the text's
keys/values; 10 prompt tokens; popsize 10): see METHOD_OPTIONS. In-context learning puts its
demonstrations before the text (prefix). White-box prompt tuning trains locally (no calls).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo import BIN, free_port, wait_healthy  # the demo's server helpers

CMA = {"popsize": 10, "prompt_length": 10}
METHOD_OPTIONS: dict[str, dict] = {
    "manual": {},
    "icl": {},
    "bbt": {**CMA, "intrinsic_dim": 500},
    "bbtv2": {**CMA, "intrinsic_dim": 500},
    "dept": {**CMA},
    "bdpl": {"prompt_length": 10, "num_samples": 10, "lr": 0.01},  # 1e-2: the paper's 1e-4 barely moves in 100 calls
    "prompt-tuning": {"prompt_length": 10, "epochs": 10},
    "gdfo": {**CMA, "intrinsic_dim": 500},
}
PREFIX_METHODS = {"icl"}


def run_one(url: str, task: str, method: str, seed: int, args, out: Path, extra: dict) -> dict:
    """One `lmaas tune` (or its resumption); returns result.json."""
    result_path = out / "result.json"
    if result_path.exists():
        return json.loads(result_path.read_text())
    options = {**METHOD_OPTIONS[method], **extra}
    command = [str(BIN / "lmaas"), "tune", "--server", url, "--task", task, "--method", method,
               "--budget", str(args.budget), "--seed", str(seed), "--out", str(out),
               "--placement", "prefix" if method in PREFIX_METHODS else "suffix",
               "--eval-every", str(args.eval_every)]  # fmt: skip
    if args.test_size != "default":  # default: the task's own (full, or AG News' and SNLI's fixed 1,000)
        command += ["--test-size", str(args.test_size)]
    if args.test_at:
        command += ["--test-at", args.test_at]
    for key, value in options.items():
        command += ["-o", f"{key}={value}"]
    if (out / "checkpoint.pkl").exists():
        command.append("--resume")
    print(f"==> {task} {method} seed {seed}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env={**os.environ, "LMAAS_NO_PROGRESS": "1"})
    print(f"    {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads(result_path.read_text())


def start_server(args) -> tuple[str, subprocess.Popen | None]:
    if args.server:
        return args.server, None
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "lmaas-server"), "serve", "--no-auth", "--budget", str(10**9), "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, env={**os.environ, "LMAAS_INPUT_CACHE_BYTES": str(args.cache_bytes)})
    wait_healthy(url, server)
    return url, server


def run(args) -> None:
    extra = json.loads(args.options) if args.options else {}
    url, server = start_server(args)
    try:
        # seed outermost: a stopped bench leaves whole seeds (every task and method); the test sets do not
        # depend on the seed, so their texts' keys/values stay in the server's input cache across seeds
        for seed in (int(s) for s in args.seeds.split(",")):
            for task in args.tasks.split(","):
                for method in args.methods.split(","):
                    out = Path(args.out) / task / f"{method}-{seed}"
                    run_one(url, task, method, seed, args, out, extra.get(method, {}))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=60)


def mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    if len(values) == 1:  # one seed: no spread to report
        return f"{100 * values[0]:.1f}"
    return f"{100 * statistics.mean(values):.1f} ± {100 * statistics.stdev(values):.1f}"


def table(args) -> None:
    """Markdown: test score mean ± std over seeds per task and method, calls and wall time per run."""
    root = Path(args.out)
    results = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/result.json"))]
    tasks = sorted({r["task"] for r in results}, key=lambda t: ["sst2", "agnews", "rte"].index(t) if t in
                   ["sst2", "agnews", "rte"] else 9)  # fmt: skip
    methods = [m for m in METHOD_OPTIONS if any(r["method"] == m for r in results)]
    print("| method | " + " | ".join(tasks) + " | tuning calls | seconds per run (mean) |")
    print("|---|" + "---|" * len(tasks) + "---|---|")
    zero = {t: [r["manual_prompt_test_acc"] for r in results if r["task"] == t and r["method"] == "manual"]
            for t in tasks}  # fmt: skip
    for method in methods:
        cells, calls, seconds = [], set(), []
        for task in tasks:
            runs = [r for r in results if r["task"] == task and r["method"] == method]
            cells.append(f"{mean_std([r['test_acc'] for r in runs])} (n={len(runs)})")
            calls |= {r["calls_used"] for r in runs}
            seconds += [r["seconds"] for r in runs]
        wall = f"{statistics.mean(seconds):.0f}" if seconds else "–"
        print(f"| {method} | " + " | ".join(cells) + f" | {', '.join(map(str, sorted(calls)))} | {wall} |")
    print()
    print("manual prompt per task (from the manual runs): " + ", ".join(f"{t} {mean_std(v)}" for t, v in zero.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    go = sub.add_parser("run")
    go.add_argument("--tasks", default="sst2,agnews,rte")
    go.add_argument("--seeds", default="13,42,100")
    go.add_argument("--methods", default="manual,icl,bbt,bbtv2,dept,bdpl,prompt-tuning")
    go.add_argument("--budget", type=int, default=100)
    go.add_argument("--test-size", default="100", help="N, full, or default (the task's own test set)")
    go.add_argument("--eval-every", type=int, default=25)
    go.add_argument("--test-at", help="call counts at which the selected prompt is scored on test (a curve)")
    go.add_argument("--server", help="an already running server (default: start one here)")
    go.add_argument("--model", help="served model (default: the offline SmolLM2-135M-Instruct)")
    go.add_argument("--options", help='JSON: extra options per method, e.g. {"gdfo": {"student": null}}')
    go.add_argument("--cache-bytes", type=int, default=4 << 30)
    go.add_argument("--out", default="bench/results/methods")
    show = sub.add_parser("table")
    show.add_argument("--out", default="bench/results/methods")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
