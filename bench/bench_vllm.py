"""Serving speed by backend: candidates per second through the gateway over HTTP, transformers (the model in the
gateway's process) vs vLLM (a `vllm serve` process scoring the rows), with 1 and 4 concurrent clients.

The serving benchmark's workload (bench/bench_serving.py, setup 5): SST-2's 32 training examples registered
once, populations of 20 candidates per request, the prompt after the text (suffix placement), in two forms:
- BBT: soft prompts sent as z with a server-side projection (vLLM receives prompt embeddings);
- BDPL: discrete prompts of 10 token ids (vLLM receives token ids, its prefix caching applies).

    python bench/bench_vllm.py --vllm-python .venv-vllm/bin/python [--json bench/results/vllm_cpu.json]
    python bench/bench_vllm.py --vllm-url http://127.0.0.1:8000        # a vLLM already serving the model

Both backends serve the same weights in `--dtype` (float32 by default). vLLM is started as tests/support/
vllm_process.py does (the offline default model) unless --vllm-url names one already running (then --model must
name the same weights for the gateway, and vLLM's served name is taken from it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_serving import INTRINSIC_DIM, concurrent_rate  # noqa: E402
from lmaas_client import LMaaSClient  # noqa: E402
from lmaas_client.tasks import get_task  # noqa: E402
from lmaas_client.tasks.data import load_split  # noqa: E402
from lmaas_protocol import Candidate, EvaluateRequest, InputsSpec, Projected, ProjectionSpec, Tensor  # noqa: E402
from lmaas_server.config import Settings  # noqa: E402
from lmaas_server.engine import Engine  # noqa: E402
from lmaas_server.main import create_app  # noqa: E402
from lmaas_server.model_loading import load_model  # noqa: E402
from tests.conftest import LiveServer, free_port  # noqa: E402


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vllm-url", help="a vLLM server already running (default: start one)")
    parser.add_argument("--vllm-python", help="the Python of vLLM's environment, to start one")
    parser.add_argument("--vllm-arg", action="append", default=[], help="an extra `vllm serve` option (repeat)")
    parser.add_argument("--model", help="the gateway's model (default: LMAAS_MODEL or the offline default)")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--candidates", type=int, default=20)
    parser.add_argument("--prompt-length", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2, help="requests per client after its warm-up")
    parser.add_argument("--examples", type=int, help="the first N training examples (default: all 32)")
    parser.add_argument("--clients", default="1,4")
    parser.add_argument("--json", type=Path)
    return parser.parse_args(argv)


def workloads(engine: Engine, args: argparse.Namespace) -> dict:
    """(inputs spec, candidates, projections) per form, seeded: the same for both backends."""
    task = get_task("sst2")
    train = load_split(task, "train", 42, REPO / "data")[: args.examples]
    words = task.label_words["causal"]
    verbalizer = [[engine.loaded.tokenizer(w, add_special_tokens=False)["input_ids"][0]] for w in words]
    spec = InputsSpec(template=task.template("causal", "suffix"), examples=train, verbalizer=verbalizer)
    rng = np.random.default_rng(0)
    projection = ProjectionSpec(seed=1, scale=engine.info.embedding_std / np.sqrt(INTRINSIC_DIM), dim=INTRINSIC_DIM,
                                shape=[args.prompt_length, engine.hidden_size])  # fmt: skip
    zs = rng.standard_normal((args.candidates, INTRINSIC_DIM)).astype(np.float32)
    bbt = [Candidate(soft_prompt=Projected(z=Tensor.from_numpy(z), projection="bbt")) for z in zs]
    bdpl = [Candidate(prompt_token_ids=rng.integers(0, engine.vocab_size, args.prompt_length).tolist())
            for _ in range(args.candidates)]  # fmt: skip
    return {"bbt": (spec, bbt, {"bbt": projection}), "bdpl": (spec, bdpl, None)}


def rates(engine: Engine, forms: dict, args: argparse.Namespace) -> dict:
    out: dict = {}
    with LiveServer(create_app(engine.settings, engine=engine)) as server:
        for form, (spec, candidates, projections) in forms.items():

            def factory(client: LMaaSClient, spec=spec, candidates=candidates, projections=projections):
                handle = client.register_inputs(spec).handle
                return EvaluateRequest(inputs=handle, candidates=candidates, projections=projections)

            for clients in map(int, args.clients.split(",")):
                rate = concurrent_rate(server.url, factory, clients, args.rounds, args.candidates)
                out[f"{form}_{clients}_clients"] = rate
                print(f"{engine.backend.name:12} {form:5} {clients} clients: {rate:.2f} candidates/s", flush=True)
    return out


def measure(args: argparse.Namespace) -> dict:
    process = None
    url = args.vllm_url
    if url is None:
        from tests.support.vllm_process import start_vllm, wait_ready

        if not args.vllm_python:
            raise SystemExit("give --vllm-url or --vllm-python")
        port, log = free_port(), Path(tempfile.mkdtemp()) / "vllm.log"
        process, url = start_vllm(args.vllm_python, port, log, args.dtype, args.vllm_arg), f"http://127.0.0.1:{port}"
        wait_ready(url, process, log)
    try:
        base = dict(require_api_key=False, dtype=args.dtype, **({"model": args.model} if args.model else {}))
        loaded = load_model(Settings(**base))
        report: dict = {"rates": {}}
        for backend in ("transformers", "vllm"):
            settings = Settings(**base, backend=backend, **({"vllm_url": url} if backend == "vllm" else {}))
            engine = Engine(loaded, settings)
            forms = workloads(engine, args)
            report["rates"][backend] = rates(engine, forms, args)
            engine.close()
    finally:
        if process is not None:
            from tests.support.vllm_process import stop

            stop(process)
    import torch

    report.update({
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {loaded.device}",
        "model": loaded.name, "dtype": args.dtype, "candidates_per_request": args.candidates,
        "prompt_length": args.prompt_length, "examples": len(forms["bbt"][0].examples),
        "rounds_per_client": args.rounds,
        "vllm_over_transformers": {k: report["rates"]["vllm"][k] / report["rates"]["transformers"][k]
                                   for k in report["rates"]["vllm"]},
    })  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def main() -> None:
    print(json.dumps(measure(parse()), indent=2))


if __name__ == "__main__":
    main()
