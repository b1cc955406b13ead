"""BBTv2 calls with and without reusing the layers below the tuned one, side by side on one engine.

The default model (SmolLM2, 30 layers), 32 SST-2 training examples registered once (suffix placement: the
text's keys/values cached), 10 prompt tokens, d = 500, a population of 10 candidates per call built by the
BBTv2 tuner itself: every layer at its best point, the tuned layer varying. One call per tuned layer over
a round (layers 0..N-1, or `--layers`), each timed with the reuse on and off, interleaved so that load on
the machine hits both alike.

    python bench/bench_deep_reuse.py [--layers 0,5,10] [--json bench/results/deep_reuse.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lmaas_client.prompts import named_specs, projection_names  # noqa: E402
from lmaas_client.tasks import get_task  # noqa: E402
from lmaas_client.tasks.data import load_split  # noqa: E402
from lmaas_client.tuners.bbtv2 import BBTv2Config, BBTv2Tuner  # noqa: E402
from lmaas_protocol import EvaluateRequest, InputsSpec  # noqa: E402
from lmaas_server.config import Settings  # noqa: E402
from lmaas_server.engine import Engine  # noqa: E402
from lmaas_server.metering.budget import CallBudget  # noqa: E402
from lmaas_server.model_loading import load_model  # noqa: E402


def generation(tuner: BBTv2Tuner, layer: int, handle: str, rng: np.random.Generator) -> EvaluateRequest:
    """One BBTv2 call: `popsize` z for `layer`, every other layer at its best z, as the tuner sends it."""
    zs = rng.normal(0, tuner.config.sigma, (tuner.config.popsize, tuner.config.intrinsic_dim))
    prompts = [tuner.prompt(z, layer) for z in zs]
    names = projection_names(prompts)
    return EvaluateRequest(
        inputs=handle, candidates=[p.to_wire(names) for p in prompts], projections=named_specs(prompts, names)
    )


def call(engine: Engine, request: EvaluateRequest, reuse: bool) -> tuple[float, np.ndarray]:
    engine.loaded.forward.layer_reuse.enabled = reuse
    start = time.perf_counter()
    response = engine.evaluate(request, CallBudget(None))
    seconds = time.perf_counter() - start
    return seconds, np.stack([r.logits.to_numpy() for r in response.results])


def measure(args: argparse.Namespace) -> dict:
    settings = Settings(require_api_key=False, **({"model": args.model} if args.model else {}))
    engine = Engine(load_model(settings), settings)
    info = engine.info
    task = get_task("sst2")
    train = load_split(task, "train", args.seed, REPO / "data")
    verbalizer = [
        [engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in task.label_words["causal"]
    ]
    spec = InputsSpec(template=task.template("causal", "suffix"), examples=train, verbalizer=verbalizer)
    registered = engine.register_inputs(spec)
    assert registered.prefix_cache, registered.prefix_cache_reason
    config = BBTv2Config(popsize=args.popsize, prompt_length=args.prompt_length, intrinsic_dim=args.intrinsic_dim)
    tuner = BBTv2Tuner(config, info)
    rng = np.random.default_rng(args.seed)
    tuner.best_z = [rng.normal(0, config.sigma, config.intrinsic_dim) for _ in range(tuner.num_layers)]  # round 2+
    layers = [int(x) for x in args.layers.split(",")] if args.layers else list(range(tuner.num_layers))
    warm = generation(tuner, layers[0], registered.handle, rng)
    for reuse in (True, False):  # warm-up: projections, prefix cache, allocator
        call(engine, warm, reuse)
    rows = []
    for i, layer in enumerate(layers):
        request = generation(tuner, layer, registered.handle, rng)
        order = (True, False) if i % 2 == 0 else (False, True)
        timed = {reuse: call(engine, request, reuse) for reuse in order}
        diff = float(np.abs(timed[True][1] - timed[False][1]).max())
        rows.append({"tuned_layer": layer, "reuse_s": timed[True][0], "plain_s": timed[False][0], "max_abs_diff": diff})
        print(f"layer {layer:2d}: reuse {timed[True][0]:.3f} s, plain {timed[False][0]:.3f} s, diff {diff:.2e}")
    engine.loaded.forward.layer_reuse.enabled = True
    engine.close()
    reuse_total, plain_total = sum(r["reuse_s"] for r in rows), sum(r["plain_s"] for r in rows)
    return {
        "what": "BBTv2 calls over a round of tuned layers, layer reuse on vs off (same engine, interleaved)",
        "model": info.name,
        "num_layers": info.num_layers,
        "dtype": info.dtype,
        "examples": len(train),
        "placement": "suffix (registered inputs, prefix cache on)",
        "popsize": args.popsize,
        "prompt_length": args.prompt_length,
        "intrinsic_dim": args.intrinsic_dim,
        "machine": {"platform": platform.platform(), "torch_threads": torch.get_num_threads(), "device": info.device},
        "calls": rows,
        "reuse_s_per_call": reuse_total / len(rows),
        "plain_s_per_call": plain_total / len(rows),
        "speedup": plain_total / reuse_total,
        "max_abs_diff": max(r["max_abs_diff"] for r in rows),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", help="comma-separated tuned layers (default: every layer, one round)")
    parser.add_argument("--popsize", type=int, default=10)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--intrinsic-dim", type=int, default=500)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", help="model to serve (default: LMAAS_MODEL or the offline default)")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = measure(args)
    print(f"{report['plain_s_per_call']:.3f} s per call plain, {report['reuse_s_per_call']:.3f} s with reuse: "
          f"{report['speedup']:.2f}x (max |logit diff| {report['max_abs_diff']:.1e})")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
