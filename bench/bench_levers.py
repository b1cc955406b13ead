"""Accuracy-per-call screens of the tuning levers (calibration, warm starts, search settings): learning curves on
full test sets, in-process runs (`Run`) against one `lmaas-server`, so registered test sets keep their cached
keys/values across runs. Finished runs (result.json) are skipped; stopped ones resume from their checkpoint.

    python bench/bench_levers.py --out bench/results/calib/smollm2 --tasks sst2,agnews --seeds 13 \\
        --variant 'bbt={"popsize":10,"prompt_length":10,"intrinsic_dim":500,"calibrate":false}' \\
        --variant 'bbt-cal={"popsize":10,"prompt_length":10,"intrinsic_dim":500,"calibrate":true}' \\
        --variant 'bbt-ins-cal={"popsize":10,"intrinsic_dim":500,"init_tokens":"instruction","calibrate":true}'
    python bench/curves.py table --at 300 --task sst2 --series "BBT=bench/results/calib/smollm2:bbt" ...

Each variant is a BBT run (suffix placement) with the given options; `--method` changes the method. Runs
calibrate by default since 2026-12-01: plain BBT (the papers' objective) needs `"calibrate":false`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from demo import BIN, free_port, wait_healthy

from lmaas_client import LMaaSClient
from lmaas_client.run import CHECKPOINT, Run, RunConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", help="served model (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--tasks", default="sst2,agnews")
    parser.add_argument("--seeds", default="13,42,100")
    parser.add_argument("--method", default="bbt")
    parser.add_argument("--budget", type=int, default=300)
    parser.add_argument("--test-at", default="50,100,200,300")
    parser.add_argument("--variant", action="append", required=True, help="TAG=JSON options")
    args = parser.parse_args()
    variants = dict(v.split("=", 1) for v in args.variant)
    with served(args.model) as url:
        for seed in (int(s) for s in args.seeds.split(",")):
            for task in args.tasks.split(","):
                for tag, options in variants.items():
                    run_one(url, args, task, seed, tag, json.loads(options))


@contextmanager
def served(model: str | None = None) -> Iterator[str]:
    """A keyless `lmaas-server` for benchmarks (no budget, no request timeout in the way); yields its URL."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [str(BIN / "lmaas-server"), "serve", "--no-auth", "--budget", str(10**9), "--port", str(port),
               "--log-level", "warning", *(["--model", model] if model else [])]  # fmt: skip
    # a loaded 2-core machine can take minutes to score a full test set: no request timeout in the way
    env = {"LMAAS_INPUT_CACHE_BYTES": str(3 * 10**9), "LMAAS_REQUEST_TIMEOUT_S": "7200",
           "LMAAS_STALE_RESERVATION_S": "14400"}  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, **env})
    try:
        wait_healthy(url, server)
        yield url
    finally:
        server.terminate()
        server.wait(timeout=60)


def run_one(url: str, args: argparse.Namespace, task: str, seed: int, tag: str, options: dict) -> None:
    out = args.out / task / f"{tag}-{seed}"
    if (out / "result.json").exists():
        return
    config = RunConfig(task, args.method, args.budget, seed, "suffix", 25, None, None, {**options, "seed": seed},
                       [int(c) for c in args.test_at.split(",")])  # fmt: skip
    started = time.perf_counter()
    with LMaaSClient(url, timeout=7200.0) as client:
        resumed = (out / CHECKPOINT).exists()
        with Run.resume(out, client) if resumed else Run.create(out, config, client) as run:
            result = run.tune()
    points = [(p["calls"], round(p["test_score"], 4)) for p in result.curve if p.get("test_score") is not None]
    print(f"{task} {tag} seed {seed}: manual {result.manual_prompt_test_acc:.4f} calibrated manual "
          f"{result.manual_calibrated_test_acc} test {result.test_acc} curve {points} "
          f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
