"""The GPU check, after `bench/gpu_check.sh` installed everything: the serving benchmark in float32 and bfloat16
(1 and 4 concurrent clients among its measurements), then one BBT tune on SST-2 end to end (`lmaas-server` +
`lmaas tune`, suffix placement, popsize 20, 8,000 calls) with its wall time and test accuracy. Writes
`gpu_check.json` and `gpu_check.md` (a table) into `--out`.

    python bench/gpu_check.py --out DIR            # the full check (a GPU, about 5 minutes on one H200)
    python bench/gpu_check.py --out DIR --small    # a CPU-sized pass through every step (tiny sizes)

`--small` (`GPU_CHECK_SMALL=1` in the shell script) runs the very same steps with a few candidates, examples and
calls, on `--model` (e.g. a tiny test model), so that CI proves the check works end to end.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "scripts"), str(REPO / "bench")]

import bench_serving  # noqa: E402
import bench_vllm  # noqa: E402
from demo import free_port, wait_healthy  # noqa: E402

FULL = {"candidates": 20, "repeats": 2, "rounds": 3, "examples": None, "budget": 8000, "popsize": 20,
        "test_size": None, "eval_every": 100}  # fmt: skip
SMALL = {"candidates": 3, "repeats": 1, "rounds": 1, "examples": 4, "budget": 12, "popsize": 4,
         "test_size": 16, "eval_every": 8}  # fmt: skip
DTYPES = ("float32", "bfloat16")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} ({torch.cuda.device_count()} GPU), torch {torch.__version__}"
    return f"CPU ({platform.machine()}, {os.cpu_count()} cores), torch {torch.__version__}"


def serving(dtype: str, sizes: dict, model: str | None, out: Path) -> dict:
    """bench_serving's five setups (1 and 4 concurrent clients among them) on the model served in `dtype`."""
    argv = ["--dtype", dtype, "--json", str(out / f"serving-{dtype}.json"), "--candidates", str(sizes["candidates"]),
            "--repeats", str(sizes["repeats"]), "--rounds", str(sizes["rounds"])]  # fmt: skip
    argv += ["--examples", str(sizes["examples"])] if sizes["examples"] else []
    argv += ["--model", model] if model else []
    started = time.perf_counter()
    report = bench_serving.measure(bench_serving.parse(argv))
    return {**report, "wall_s": time.perf_counter() - started}


def tune(sizes: dict, model: str | None, out: Path) -> dict:
    """A server process and `lmaas tune` over HTTP, as a user would run them; wall time of the tune alone."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run = out / "tune-sst2-bbt"
    server_cmd = [sys.executable, "-m", "lmaas_server.cli", "serve", "--no-auth", "--port", str(port),
                  "--log-level", "warning"]  # fmt: skip
    server_cmd += ["--model", model] if model else []
    env = {**os.environ, "LMAAS_CACHE_DIR": os.environ.get("LMAAS_CACHE_DIR", str(out / "cache"))}
    with open(out / "server.log", "w") as log:
        server = subprocess.Popen(server_cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            wait_healthy(url, server)
            with urllib.request.urlopen(f"{url}/v1/model", timeout=10) as response:
                info = json.loads(response.read())
            tune_cmd = [sys.executable, "-m", "lmaas_client.cli", "tune", "--server", url, "--task", "sst2",
                        "--method", "bbt", "--placement", "suffix", "--budget", str(sizes["budget"]),
                        "--popsize", str(sizes["popsize"]), "--eval-every", str(sizes["eval_every"]),
                        "--seed", "42", "--out", str(run)]  # fmt: skip
            tune_cmd += ["--test-size", str(sizes["test_size"])] if sizes["test_size"] else []
            started = time.perf_counter()
            subprocess.run(tune_cmd, check=True, stdout=subprocess.DEVNULL, env={**os.environ, "COLUMNS": "200"})
            wall = time.perf_counter() - started
        finally:
            server.terminate()
            server.wait(timeout=60)
    result = json.loads((run / "result.json").read_text())
    return {"wall_s": wall, "dtype": info.get("dtype"), "device": info.get("device"), "model": info.get("name"),
            "calls": result["calls_used"], "budget": sizes["budget"], "popsize": sizes["popsize"],
            "test_acc": result["test_acc"], "manual_prompt_test_acc": result["manual_prompt_test_acc"]}  # fmt: skip


def table(report: dict) -> str:
    lines = [f"GPU check on {report['device']}, {'small (CPU-sized)' if report['small'] else 'full'} run, "
             f"{report['total_s']:.0f} s in all", "",
             "| serving (calls/s) | float32 | bfloat16 |", "|---|---|---|"]  # fmt: skip
    runs = report["serving"]
    keys = ("1_reference_loop", "2_http_batched", "3_http_cached_suffix_projected", "5_concurrent_1_client",
            "5_concurrent_4_clients")  # fmt: skip
    for key in keys:
        lines.append(f"| {key} | " + " | ".join(f"{runs[d]['rates'][key]:.1f}" for d in DTYPES) + " |")
    lines.append("| 4 clients vs 1 | " + " | ".join(f"{runs[d]['concurrency_gain']:.2f}x" for d in DTYPES) + " |")
    lines.append("| cached suffix vs reference loop | "
                 + " | ".join(f"{runs[d]['ratios_to_reference']['3_http_cached_suffix_projected']:.1f}x"
                              for d in DTYPES) + " |")  # fmt: skip
    if "vllm" in report:  # candidates/s through the gateway: transformers backend vs vLLM backend
        v = report["vllm"]["rates"]
        lines += ["", "| backend (candidates/s) | " + " | ".join(v["transformers"]) + " |",
                  "|---|" + "---|" * len(v["transformers"])]  # fmt: skip
        lines += [f"| {name} | " + " | ".join(f"{x:.1f}" for x in v[name].values()) + " |" for name in v]
    t = report["tune"]
    lines += ["", "| BBT tune, SST-2, suffix | dtype | calls | popsize | wall time | test acc | manual prompt |",
              "|---|---|---|---|---|---|---|",
              f"| {t['model']} on {t['device']} | {t['dtype']} | {t['calls']} | {t['popsize']} | {t['wall_s']:.1f} s | "
              f"{t['test_acc']:.3f} | {t['manual_prompt_test_acc']:.3f} |"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="tiny sizes: a CPU pass through every step")
    parser.add_argument("--model", help="model to serve (default: LMAAS_MODEL or the offline default)")
    parser.add_argument("--vllm-python", help="also benchmark the vLLM backend, vLLM run by this Python")
    args = parser.parse_args()
    sizes = SMALL if args.small else FULL
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    report: dict = {"device": device_name(), "small": args.small, "sizes": sizes, "serving": {}}
    for dtype in DTYPES:
        print(f"==> serving benchmark, {dtype}", flush=True)
        report["serving"][dtype] = serving(dtype, sizes, args.model, args.out)
    print(f"==> BBT tune on SST-2, {sizes['budget']} calls", flush=True)
    report["tune"] = tune(sizes, args.model, args.out)
    if args.vllm_python:  # the offline default model in bfloat16 (vLLM's dtype on a GPU), both backends
        print("==> vLLM backend benchmark", flush=True)
        # vLLM leaves the gateway (its CPU-side copy here on the same GPU, and the transformers backend) room
        argv = ["--vllm-python", args.vllm_python, "--vllm-arg=--gpu-memory-utilization=0.5", "--dtype", "bfloat16", "--json", str(args.out / "vllm.json"),
                "--candidates", str(sizes["candidates"]), "--rounds", str(sizes["rounds"])]  # fmt: skip
        report["vllm"] = bench_vllm.measure(bench_vllm.parse(argv))
    report["total_s"] = time.perf_counter() - started
    (args.out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / "gpu_check.md").write_text(table(report))
    print(table(report), flush=True)


if __name__ == "__main__":
    main()
