"""Served dtype: accuracy and speed of float32 vs bfloat16 (or float16) on the default model, in one run.

Accuracy: the manual prompt (empty) and one fixed tuned prompt (a saved BBT result) on the full SST-2 test set,
through the served path (registered inputs, suffix placement, prefix cache where the start-up check keeps it
on), in each dtype; plus the decisions that differ between the dtypes and the largest class-logit difference.
Speed: seconds per call (one candidate on the 32 training examples of split 16-42) on the cached suffix path
(server-side projection, 20 candidates per request, as `bench_serving.py` setup 3) and on the prefix placement
(no cache, raw prompts) and for DePT (4 candidates of its default shapes per request: the offset changes the
text's embeddings, so no cache applies), the dtypes' engines called alternately in one process so that load on a shared
machine hits both alike. CPU seconds (all threads) are reported next to wall seconds for that reason.

    python bench/bench_dtype.py [--prompt bench/results/calib/smollm2/sst2/bbt-13/prompt.npz]
        [--dtypes float32,bfloat16] [--repeats 3] [--json bench/results/dtype/smollm2-sst2.json]
"""

from __future__ import annotations

import argparse
import gc
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

from lmaas_client.tasks import get_task  # noqa: E402
from lmaas_client.tasks.data import load_split  # noqa: E402
from lmaas_protocol import (  # noqa: E402
    Candidate,
    EvaluateRequest,
    InputsSpec,
    LowRankOffset,
    Projected,
    ProjectionSpec,
    Tensor,
    materialize,
    project,
)
from lmaas_server.config import Settings  # noqa: E402
from lmaas_server.engine import Engine  # noqa: E402
from lmaas_server.metering.budget import CallBudget  # noqa: E402
from lmaas_server.model_loading import load_model  # noqa: E402

INTRINSIC_DIM = 500
DEFAULT_PROMPT = REPO / "bench/results/calib/smollm2/sst2/bbt-13/prompt.npz"


def engine_for(dtype: str, model: str | None) -> Engine:
    settings = Settings(require_api_key=False, device="cpu", dtype=dtype, model=model, input_cache_bytes=8 << 30,
                        request_timeout_s=86400)  # fmt: skip
    return Engine(load_model(settings), settings)


def verbalizer_of(engine: Engine, task) -> list[list[int]]:
    return [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in task.label_words["causal"]]


def tuned_candidate(path: Path) -> Candidate:
    saved = np.load(path, allow_pickle=False)
    ids = [int(i) for i in saved["prompt_token_ids"]] if "prompt_token_ids" in saved.files else None
    return Candidate(soft_prompt=Tensor.from_numpy(saved["soft_prompt"].astype(np.float32)), prompt_token_ids=ids)


def accuracy(engine: Engine, task, test, candidates: list[Candidate]) -> dict:
    """Class logits [candidates, examples, classes] and accuracy per candidate on the registered test set."""
    spec = InputsSpec(template=task.template("causal", "suffix"), examples=test, verbalizer=verbalizer_of(engine, task))
    handle = engine.register_inputs(spec).handle
    start, cpu = time.perf_counter(), time.process_time()
    response = engine.evaluate(EvaluateRequest(inputs=handle, candidates=candidates), CallBudget(None))
    return {
        "logits": np.stack([r.logits.to_numpy() for r in response.results]),
        "accuracy": [float(r.accuracy) for r in response.results],
        "wall_s": time.perf_counter() - start,
        "cpu_s": time.process_time() - cpu,
    }


def timed(fn) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - start, time.process_time() - cpu


SETUPS = ("cached_suffix", "prefix_no_cache", "dept")


def dept_candidates(info, count: int) -> list[Candidate]:
    """DePT's default shapes (client tuners/dept.py): an 8-token soft prompt plus a rank-4 offset of the first 128
    text positions, a [128, 4] and b [4, hidden], elements at about half the embedding std."""
    rng = np.random.default_rng(1)
    std, hidden = info.embedding_std, info.hidden_size

    def tensor(scale: float, shape: tuple[int, int]) -> Tensor:
        return Tensor.from_numpy(rng.normal(0, scale, shape).astype(np.float32))

    offset = lambda: LowRankOffset(a=tensor(1.0, (128, 4)), b=tensor(std / 8, (4, hidden)), scale=4.0)  # noqa: E731
    return [Candidate(soft_prompt=tensor(std, (8, hidden)), embedding_offset=offset()) for _ in range(count)]


def speed(engines: dict[str, Engine], task, train, candidates: int, repeats: int) -> dict:
    """Seconds per call (per candidate), wall and CPU, the dtypes alternating call by call."""
    any_engine = next(iter(engines.values()))
    info = any_engine.info
    spec = ProjectionSpec(seed=1, scale=info.embedding_std / np.sqrt(INTRINSIC_DIM), dim=INTRINSIC_DIM,
                          shape=[10, info.hidden_size])  # fmt: skip
    zs = np.random.default_rng(0).standard_normal((candidates, INTRINSIC_DIM))
    projected = [Candidate(soft_prompt=Projected(z=Tensor.from_numpy(z, dtype="float32"), projection="p")) for z in zs]
    raw = Candidate(soft_prompt=Tensor.from_numpy(project(zs[0], materialize(spec), spec).astype(np.float32)))
    dept = dept_candidates(info, min(candidates, 4))
    requests = {}
    for dtype, engine in engines.items():
        suffix = InputsSpec(template=task.template("causal", "suffix"), examples=train,
                            verbalizer=verbalizer_of(engine, task))  # fmt: skip
        handle = engine.register_inputs(suffix).handle
        requests[dtype] = {
            "cached_suffix": (EvaluateRequest(inputs=handle, candidates=projected, projections={"p": spec}), candidates),
            "prefix_no_cache": (EvaluateRequest(template=task.template("causal", "prefix"), examples=train,
                                                verbalizer=verbalizer_of(engine, task), candidates=[raw]), 1),
            # DePT's offset changes the text's embeddings, so no cached keys/values apply (the uncached path)
            "dept": (EvaluateRequest(inputs=handle, candidates=dept), len(dept)),
        }  # fmt: skip
    results: dict = {}
    for setup in SETUPS:
        samples: dict[str, list[tuple[float, float]]] = {d: [] for d in engines}
        for round_ in range(repeats + 1):  # round 0 warms up (and builds the text cache)
            for dtype, engine in engines.items():
                request, calls = requests[dtype][setup]
                wall, cpu = timed(lambda e=engine, r=request: e.evaluate(r, CallBudget(None)))
                if round_:
                    samples[dtype].append((wall / calls, cpu / calls))
        results[setup] = {
            d: {
                "wall_s_per_call": statistics.median(w for w, _ in s),
                "cpu_s_per_call": statistics.median(c for _, c in s),
            }
            for d, s in samples.items()
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="served model (default: the offline SmolLM2-135M-Instruct)")
    parser.add_argument("--prompt", type=Path, default=DEFAULT_PROMPT, help="a saved tuned prompt (.npz)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--test-limit", type=int, help="score only the first N test examples (a quick check)")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    dtypes = args.dtypes.split(",")
    task = get_task("sst2")
    test = load_split(task, "test", 0, REPO / "data")[: args.test_limit]
    train = load_split(task, "train", 42, REPO / "data")
    candidates = [Candidate(), tuned_candidate(args.prompt)]

    report: dict = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
                    f"torch {torch.__version__}", "test_examples": len(test), "prompt": str(args.prompt),
                    "engines": {}, "accuracy": {}}  # fmt: skip
    scores = {}
    for dtype in [] if args.skip_accuracy else dtypes:  # one engine at a time: the test set's text cache is large
        engine = engine_for(dtype, args.model)
        report["engines"][dtype] = {"dtype": engine.info.dtype, "prefix_cache": engine.info.prefix_cache}
        scores[dtype] = accuracy(engine, task, test, candidates)
        report["accuracy"][dtype] = {k: v for k, v in scores[dtype].items() if k != "logits"}
        print(dtype, report["engines"][dtype], report["accuracy"][dtype], flush=True)
        engine.close()
        del engine
        gc.collect()
    if len(scores) > 1:
        base, *others = dtypes
        for other in others:
            a, b = scores[base]["logits"], scores[other]["logits"]
            report["accuracy"][f"{other}_vs_{base}"] = {
                "decisions_differing": [int(n) for n in (a.argmax(-1) != b.argmax(-1)).sum(-1)],
                "max_abs_class_logit_difference": [float(d) for d in np.abs(a - b).max(axis=(1, 2))],
                "accuracy_points": [100 * (y - x) for x, y in zip(report["accuracy"][base]["accuracy"],
                                                                 report["accuracy"][other]["accuracy"], strict=True)],
            }  # fmt: skip
    engines = {dtype: engine_for(dtype, args.model) for dtype in dtypes}
    report["engines"] = {d: {"dtype": e.info.dtype, "prefix_cache": e.info.prefix_cache} for d, e in engines.items()}
    report["speed"] = speed(engines, task, train, args.candidates, args.repeats)
    for engine in engines.values():
        engine.close()
    print(json.dumps(report, indent=2))
    print(markdown(report, dtypes))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


def markdown(report: dict, dtypes: list[str]) -> str:
    lines = ["| dtype | prefix cache | manual prompt acc | tuned prompt acc | cached suffix s/call (CPU s) | "
             "prefix, no cache s/call (CPU s) | DePT s/call (CPU s) |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for d in dtypes:
        acc = report["accuracy"].get(d, {}).get("accuracy", [float("nan")] * 2)
        speed_of = {k: report["speed"][k][d] for k in report["speed"]}
        cells = [f"{s['wall_s_per_call']:.3f} ({s['cpu_s_per_call']:.3f})" for s in speed_of.values()]
        lines.append(f"| {d} | {'on' if report['engines'][d]['prefix_cache'] else 'off'} | {100 * acc[0]:.2f} | "
                     f"{100 * acc[1]:.2f} | {' | '.join(cells)} |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
