"""Serving speed: candidate evaluations per second, five ways, in one run on the same model and data.

1. reference loop: in-process, one forward per candidate, prompt prepended, full-vocabulary logits, no
   cache (the BBT code's way);
2. the server over HTTP with population batching (prompt prepended, raw prompts in a bundle body);
3. plus cached inputs: a registered example set, the prompt after the text (the text's keys/values are
   reused), candidates sent as z with a server-side projection;
4. in-process with the same batching as 2 (the engine without HTTP), to isolate HTTP/serialization;
5. aggregate throughput of setup 3 with 1 and with 4 concurrent clients.

Also: upload bytes per candidate (raw prompt vs server-side projection), and the largest logit
difference between the reference loop and the server on the same candidates.

    python bench/bench_serving.py [--candidates 20] [--prompt-length 10] [--json bench/results/serving.json]

The model, device and dtype come from the server's settings (`LMAAS_MODEL`, `LMAAS_DEVICE`, `LMAAS_DTYPE`, ...;
`--model` overrides the first); `bench/gpu_check.sh` runs it on a GPU in float32 and bfloat16.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
_DTYPE_SET = os.environ.get("LMAAS_DTYPE")  # before tests.conftest sets its default
sys.path.insert(0, str(REPO))

from lmaas_client import LMaaSClient  # noqa: E402
from lmaas_client.tasks import get_task  # noqa: E402
from lmaas_client.tasks.data import load_split  # noqa: E402
from lmaas_protocol import (  # noqa: E402
    Candidate,
    EvaluateRequest,
    InputsSpec,
    Projected,
    ProjectionSpec,
    Tensor,
    encode_bundle,
    materialize,
    project,
)
from lmaas_runtime import FrozenLM  # noqa: E402
from lmaas_server.config import Settings  # noqa: E402
from lmaas_server.engine import Engine  # noqa: E402
from lmaas_server.main import create_app  # noqa: E402
from lmaas_server.metering.budget import CallBudget  # noqa: E402
from lmaas_server.model_loading import load_model  # noqa: E402
from tests.conftest import LiveServer  # noqa: E402

# tests.conftest pins test servers to float32 for their references; a benchmark serves what the user asked for
if os.environ.get("LMAAS_DTYPE") == "float32" and _DTYPE_SET is None:
    del os.environ["LMAAS_DTYPE"]

INTRINSIC_DIM = 500


def reference_loop(loaded: FrozenLM, request: EvaluateRequest) -> np.ndarray:
    """One full forward per candidate over all examples, prompt embeddings concatenated in front."""
    model, tokenizer = loaded.model, loaded.tokenizer
    texts = [
        request.template.replace("{prompt}", "").replace("{mask}", "").format(text_a=e.text_a) for e in request.examples
    ]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=True)
    device, dtype = loaded.device, loaded.dtype
    attention = encoded["attention_mask"].to(device)
    lengths = attention.sum(1)
    words = [ids[0] for ids in request.verbalizer]
    out = []
    with torch.inference_mode():
        embeds = model.get_input_embeddings()(encoded["input_ids"].to(device))
        for candidate in request.candidates:
            prompt = torch.from_numpy(np.array(candidate.soft_prompt.to_numpy(), dtype=np.float32)).to(device, dtype)
            batch = torch.cat([prompt.expand(len(texts), -1, -1), embeds], dim=1)
            ones = torch.ones(len(texts), prompt.shape[0], dtype=attention.dtype, device=device)
            logits = model(inputs_embeds=batch, attention_mask=torch.cat([ones, attention], 1)).logits  # [N, T, V]
            last = logits[torch.arange(len(texts), device=device), prompt.shape[0] + lengths - 1]
            out.append(last[:, words].float().cpu().numpy())
    return np.stack(out)


def rate(fn, candidates: int, repeats: int) -> float:
    fn()  # warm-up (also builds caches that later calls reuse, as a tuning run would)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return candidates / statistics.median(times)


def concurrent_rate(url: str, request_factory, clients: int, rounds: int, candidates: int) -> float:
    def work() -> None:
        with LMaaSClient(url) as client:
            request = request_factory(client)
            client.evaluate(request)  # warm-up per client
            barrier.wait()
            for _ in range(rounds):
                client.evaluate(request)

    barrier = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=work) for _ in range(clients)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    return clients * rounds * candidates / (time.perf_counter() - start)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="requests per client in the concurrency test")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--examples", type=int, help="the first N training examples (default: all 32)")
    parser.add_argument("--model", help="model to serve (default: LMAAS_MODEL or the offline default)")
    parser.add_argument("--dtype", help="float32, bfloat16, ... (default: LMAAS_DTYPE or auto)")
    parser.add_argument(
        "--reference-dtype",
        default="float32",
        help="dtype of the reference loop (the BBT code runs float32 on a CPU); 'served': the server's",
    )
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """All five setups on one engine; the report (also written to `args.json` if given)."""
    overrides = {k: v for k, v in (("model", args.model), ("dtype", args.dtype)) if v}
    settings = Settings(require_api_key=False, **overrides)  # an in-process benchmark server: no keys
    engine = Engine(load_model(settings), settings)
    info = engine.info
    task = get_task("sst2")
    train = load_split(task, "train", args.seed, REPO / "data")[: args.examples]
    verbalizer = [
        [engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in task.label_words["causal"]
    ]
    spec = ProjectionSpec(seed=1, scale=info.embedding_std / np.sqrt(INTRINSIC_DIM), dim=INTRINSIC_DIM,
                          shape=[args.prompt_length, info.hidden_size])  # fmt: skip
    rng = np.random.default_rng(0)
    zs = rng.standard_normal((args.candidates, INTRINSIC_DIM))
    prompts = [project(z, materialize(spec), spec) for z in zs]
    raw = [Candidate(soft_prompt=Tensor.from_numpy(p)) for p in prompts]
    projected = [
        Candidate(soft_prompt=Projected(z=Tensor.from_numpy(z, dtype="float32"), projection="bbt")) for z in zs
    ]
    prefix = EvaluateRequest(
        template=task.template("causal", "prefix"), examples=train, verbalizer=verbalizer, candidates=raw
    )
    suffix = InputsSpec(template=task.template("causal", "suffix"), examples=train, verbalizer=verbalizer)

    results: dict[str, float] = {}
    # the reference as the papers' code runs it (float32 on a CPU), a separate copy if the server serves another dtype
    reference_model = engine.loaded
    if args.reference_dtype not in ("served", info.dtype):
        reference_model = load_model(settings.model_copy(update={"dtype": args.reference_dtype}))
    results["1_reference_loop"] = rate(lambda: reference_loop(reference_model, prefix), args.candidates, 1)
    results["4_in_process_batched"] = rate(
        lambda: engine.evaluate(prefix, CallBudget(None)), args.candidates, args.repeats
    )
    with LiveServer(create_app(settings, engine=engine)) as server, LMaaSClient(server.url) as client:
        results["2_http_batched"] = rate(lambda: client.evaluate(prefix), args.candidates, args.repeats)
        handle = client.register_inputs(suffix).handle
        cached = EvaluateRequest(inputs=handle, candidates=projected, projections={"bbt": spec})
        results["3_http_cached_suffix_projected"] = rate(lambda: client.evaluate(cached), args.candidates, args.repeats)

        def factory(c: LMaaSClient) -> EvaluateRequest:
            return EvaluateRequest(
                inputs=c.register_inputs(suffix).handle, candidates=projected, projections={"bbt": spec}
            )

        results["5_concurrent_1_client"] = concurrent_rate(server.url, factory, 1, args.rounds, args.candidates)
        results["5_concurrent_4_clients"] = concurrent_rate(server.url, factory, 4, args.rounds, args.candidates)
        served = np.stack(
            [r.logits.to_numpy() for r in client.evaluate(prefix.model_copy(update={"candidates": raw[:2]})).results]
        )
    reference = reference_loop(engine.loaded, prefix.model_copy(update={"candidates": raw[:2]}))

    one = prefix.model_copy(update={"candidates": raw[:1]})
    upload_raw = (len(encode_bundle(prefix)) - len(encode_bundle(one))) / (args.candidates - 1)
    cached_one = cached.model_copy(update={"candidates": projected[:1]})
    upload_projected = (len(encode_bundle(cached)) - len(encode_bundle(cached_one))) / (args.candidates - 1)
    report = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}, {engine.info.device}",
        "model": info.name, "dtype": info.dtype, "reference_dtype": str(reference_model.dtype).removeprefix("torch."),
        "candidates_per_request": args.candidates, "prompt_length": args.prompt_length,
        "examples": len(train), "rates": results,
        "ratios_to_reference": {k: v / results["1_reference_loop"] for k, v in results.items()},
        "http_vs_in_process": results["2_http_batched"] / results["4_in_process_batched"],
        "concurrency_gain": results["5_concurrent_4_clients"] / results["5_concurrent_1_client"],
        "upload_bytes_per_candidate": {"raw_prompt": upload_raw, "server_projection": upload_projected,
                                       "target_4d_plus_256": 4 * INTRINSIC_DIM + 256},
        "max_abs_logit_difference_reference_vs_server": float(np.abs(served - reference).max()),
    }  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    engine.close()
    return report


def main() -> None:
    print(json.dumps(measure(parse()), indent=2))


if __name__ == "__main__":
    main()
