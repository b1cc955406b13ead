"""What each served dtype can be trusted to: the tolerances the start-up checks use, and whether this CPU has
native bfloat16 (where `auto` serves bfloat16)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# Relative tolerance (of the largest |logit|) for two computations of the same logits that differ only in
# rounding: batch shapes, cached vs recomputed keys/values, a float32 vs a half-precision LM head. bfloat16 keeps
# 8 significant bits and its errors grow through the layers: on SmolLM2-135M the cached and the plain path
# differ by 4.3% of the largest logit (0.33 of 7.5), a wrong cache by 170%. float16 keeps 11 bits (8x finer).
RELATIVE_TOLERANCE = {"float32": 1e-3, "float16": 2e-2, "bfloat16": 1e-1, "float64": 1e-6}

# CPU flags (Linux /proc/cpuinfo) of instructions that compute in bfloat16 natively: AVX-512 BF16 and AMX.
NATIVE_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def relative_tolerance(dtype: torch.dtype) -> float:
    return RELATIVE_TOLERANCE.get(dtype_name(dtype), RELATIVE_TOLERANCE["float16"])


def cpu_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """True when the CPU advertises bfloat16 arithmetic (avx512_bf16 or amx_bf16); False where unknown."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(flag in flags for flag in NATIVE_BF16_FLAGS)
    return False
