"""Seconds per call of the default model: 32 SST-2 training examples, one candidate prompt per call.

Measures the engine in-process and the same engine behind the HTTP API (a real uvicorn server in a
thread, the real client), for prompt lengths 0 (the manual prompt), 10 and 50, placed before the text
(prefix) as in the BBT papers.

    python bench/bench_call.py [--repeats 3] [--seed 42] [--json bench/results/call.json]

The served dtype is the settings' (LMAAS_DTYPE; `auto` serves bfloat16 on CPUs with bfloat16 instructions).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmaas_client import LMaaSClient  # noqa: E402
from lmaas_client.tasks import get_task  # noqa: E402
from lmaas_client.tasks.data import load_split  # noqa: E402
from lmaas_protocol import Candidate, EvaluateRequest, Tensor  # noqa: E402
from lmaas_server.config import Settings  # noqa: E402
from lmaas_server.engine import Engine  # noqa: E402
from lmaas_server.main import create_app  # noqa: E402
from lmaas_server.metering.budget import CallBudget  # noqa: E402
from lmaas_server.model_loading import load_model  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402


def make_request(engine: Engine, prompt_length: int, seed: int) -> EvaluateRequest:
    task = get_task("sst2")
    train = load_split(task, "train", seed, REPO / "data")
    words = task.label_words[engine.info.family]
    verbalizer = [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]
    candidate = Candidate()
    if prompt_length:
        rng = np.random.default_rng(0)
        soft = rng.normal(0, engine.info.embedding_std, (prompt_length, engine.info.hidden_size)).astype(np.float32)
        candidate = Candidate(soft_prompt=Tensor.from_numpy(soft))
    return EvaluateRequest(
        template=task.template(engine.info.family, "prefix"),
        examples=train,
        verbalizer=verbalizer,
        candidates=[candidate],
    )


def timed(fn, repeats: int) -> tuple[float, float]:
    """Median wall and CPU seconds (all of this process's threads) per call, after one warm-up. On a shared
    machine the wall time grows with other processes' load; the CPU time much less, so compare runs by it."""
    fn()  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    settings = Settings(require_api_key=False)  # an in-process benchmark server: no keys
    engine = Engine(load_model(settings), settings)
    rows = []
    with LiveServer(create_app(settings, engine=engine)) as server, LMaaSClient(server.url) as client:
        for prompt_length in (0, 10, 50):
            request = make_request(engine, prompt_length, args.seed)
            local, local_cpu = timed(lambda: engine.evaluate(request, CallBudget(None)), args.repeats)  # noqa: B023
            remote, _ = timed(lambda: client.evaluate(request), args.repeats)  # noqa: B023 (called now)
            rows.append({"prompt_length": prompt_length, "in_process_s": local, "in_process_cpu_s": local_cpu,
                         "http_s": remote})  # fmt: skip
    machine = (
        f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(f"model {engine.info.name} on {engine.info.device} as {engine.info.dtype} ({machine}); 32 SST-2 train "
          f"examples, seed {args.seed}")  # fmt: skip
    print("| prompt tokens (prefix) | in-process s/call | in-process CPU s/call | HTTP s/call |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['prompt_length']} | {row['in_process_s']:.2f} | {row['in_process_cpu_s']:.2f} | {row['http_s']:.2f} |"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"machine": machine, "dtype": engine.info.dtype, "rows": rows}, indent=2) + "\n"
        )


if __name__ == "__main__":
    main()
