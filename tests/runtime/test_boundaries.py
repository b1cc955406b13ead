"""The package boundaries issue 15 asks for: the frozen LM's forward pass lives only in `lmaas_runtime`, and
the protocol and the client (without its `local` extra) never load torch or transformers."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import tomllib

import pytest

from tests.conftest import REPO

# Code that runs or reaches into a transformers model. Outside the runtime none of it may appear.
FORWARD_MARKERS = (
    "inputs_embeds",
    "DynamicCache",
    "past_key_values",
    "get_input_embeddings",
    "get_output_embeddings",
    "register_forward_hook",
    "register_forward_pre_hook",
    "import transformers",
    "from transformers",
    "AutoModel",
    "AutoTokenizer",
)

# (path relative to the repo, marker) -> why it may stay. Keep this short; every entry needs a reason.
ALLOWED: dict[tuple[str, str], str] = {
    ("client/lmaas_client/tuners/prompt_tuning.py", "from transformers"): "the Adafactor optimizer, not a model",
}


def _product_sources() -> list:
    return sorted(p for root in ("server", "client") for p in (REPO / root).rglob("*.py") if "egg-info" not in str(p))


def test_no_forward_pass_code_outside_the_runtime():
    found = []
    for path in _product_sources():
        text = path.read_text()
        relative = str(path.relative_to(REPO))
        for marker in FORWARD_MARKERS:
            if marker in text and (relative, marker) not in ALLOWED:
                line = text[: text.index(marker)].count("\n") + 1
                found.append(f"{relative}:{line}: {marker}")
    assert not found, "forward-pass code outside lmaas_runtime:\n" + "\n".join(found)


def test_the_scan_sees_the_product_code():
    """Guards the test above against scanning nothing (a moved folder would make it pass vacuously)."""
    names = {str(p.relative_to(REPO)) for p in _product_sources()}
    assert "server/lmaas_server/engine/engine.py" in names and "client/lmaas_client/local_model.py" in names
    runtime = (REPO / "shared" / "runtime" / "lmaas_runtime" / "forward.py").read_text()
    assert "inputs_embeds" in runtime  # the markers name what the runtime really does


@pytest.mark.parametrize(
    "modules",
    [
        "lmaas_protocol",
        "lmaas_client, lmaas_client.cli, lmaas_client.run, lmaas_client.tuners, lmaas_client.local_model",
        "lmaas_runtime, lmaas_runtime.errors, lmaas_runtime.source",
        # every runtime module: torch and transformers are imported inside the functions that use them
        "lmaas_runtime.forward, lmaas_runtime.frozen, lmaas_runtime.hooks, lmaas_runtime.loading, "
        "lmaas_runtime.prefix, lmaas_runtime.probes, lmaas_runtime.rows, lmaas_runtime.rendering",
    ],
)
def test_protocol_and_client_import_neither_torch_nor_transformers(modules):
    script = textwrap.dedent(
        f"""
        import sys
        import {modules}
        heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers"))
        assert not heavy, heavy[:5]
        print("clean")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "clean"


def test_the_protocol_distribution_depends_on_pydantic_and_numpy_only():
    project = tomllib.loads((REPO / "shared" / "protocol" / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[ <>=!~\[;]", d, maxsplit=1)[0] for d in project["dependencies"]}
    assert names == {"pydantic", "numpy"}
    assert "optional-dependencies" not in project  # no `hf` extra: model code lives in lmaas-runtime
