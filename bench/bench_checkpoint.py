"""Checkpoint cost per generation for BBTv2 on SmolLM2's shape (30 layers, d = 500, popsize 10, P = 10), the
tuner's serialisation included: before = every layer's CMA-ES serialised and the whole state pickled into one
file; after = the tuner's cached serialisations and the content-addressed blobs of `lmaas_client.checkpoints`.

    python bench/bench_checkpoint.py [--layers 30] [--generations 12]
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import tempfile
import time
from pathlib import Path

from lmaas_client import checkpoints
from lmaas_client.tuners import cmaes, make_tuner
from lmaas_protocol import ModelInfo, ServerLimits


def model(layers: int) -> ModelInfo:
    return ModelInfo(
        name="SmolLM2-shape", family="causal", architecture="LlamaForCausalLM", model_type="llama",
        num_layers=layers, hidden_size=576, vocab_size=49152, max_length=2048, embedding_std=0.1,
        layer_std=[1.0] * layers, dtype="float32", device="cpu",
        limits=ServerLimits(max_candidates=64, max_examples=64, max_seq_len=2048, max_prompt_length=64,
                            max_body_bytes=1 << 26),
    )  # fmt: skip


def plain_save(path: Path, payload) -> int:
    """What the runner did before: one pickle of everything, fsynced, atomically replaced."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as handle:
        pickle.dump(payload, handle)
        handle.flush()
        os.fsync(handle.fileno())
        size = handle.tell()
    os.replace(tmp, path)
    return size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--generations", type=int, default=12)
    args = parser.parse_args()
    tuner = make_tuner("bbtv2", model(args.layers), popsize=10, prompt_length=10, intrinsic_dim=500, seed=1)
    times: dict[str, list[float]] = {"plain": [], "blobs": []}
    sizes: dict[str, list[int]] = {"plain": [], "blobs": []}
    with tempfile.TemporaryDirectory() as folder:
        for generation in range(args.generations + 1):
            tuner.tell([float(i) for i in range(len(tuner.ask()))])
            for name in ("plain", "blobs"):
                start = time.perf_counter()
                if name == "plain":
                    state = {**tuner.state_dict(), "strategies": [cmaes.dumps(es) for es in tuner.strategies]}
                    written = plain_save(Path(folder) / "plain.pkl", state)
                else:
                    written = checkpoints.save(Path(folder) / "blobs.pkl", tuner.state_dict())
                if generation > 0:  # the first blobs save writes every layer once
                    times[name].append(time.perf_counter() - start)
                    sizes[name].append(written)
    for name in times:
        print(f"{name:6s} {statistics.median(times[name]) * 1000:8.1f} ms/save (median of {args.generations})"
              f" {statistics.mean(sizes[name]) / 1e6:8.2f} MB written/save")  # fmt: skip
    ratio = statistics.median(times["plain"]) / statistics.median(times["blobs"])
    print(
        f"plain/blobs: {ratio:.1f}x time, {statistics.mean(sizes['plain']) / statistics.mean(sizes['blobs']):.1f}x bytes"
    )


if __name__ == "__main__":
    main()
