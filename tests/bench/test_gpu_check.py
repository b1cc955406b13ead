"""`bench/gpu_check.sh` end to end in its CPU-sized form (GPU_CHECK_SMALL=1): both serving benchmarks, a server
process and an `lmaas tune` over HTTP, and the JSON and table it writes. A GPU machine runs the full form."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO


def test_the_gpu_check_runs_end_to_end_in_its_small_form(tiny_model_dirs, tmp_path):
    env = {**os.environ, "GPU_CHECK_SMALL": "1", "GPU_CHECK_SKIP_INSTALL": "1", "GPU_CHECK_PYTHON": sys.executable,
           "GPU_CHECK_MODEL": str(tiny_model_dirs["llama-long"]), "LMAAS_DEVICE": "cpu",
           "LMAAS_CACHE_DIR": str(tmp_path / "cache"), "PYTHONPATH": os.pathsep.join(sys.path)}  # fmt: skip
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), str(tmp_path / "out")], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert report["small"] is True and set(report["serving"]) == {"float32", "bfloat16"}
    for dtype, run in report["serving"].items():
        assert run["dtype"] == dtype
        assert run["rates"]["5_concurrent_1_client"] > 0 and run["rates"]["5_concurrent_4_clients"] > 0
    tune = report["tune"]
    assert tune["calls"] == tune["budget"] == 12 and 0 <= tune["test_acc"] <= 1
    table = (tmp_path / "out" / "gpu_check.md").read_text()
    assert "| 4 clients vs 1 |" in table and "BBT tune, SST-2, suffix" in table
