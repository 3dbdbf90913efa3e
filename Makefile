# Two commands set everything up on a fresh machine:
#   make demo   create the environment if missing, install, run the embedded default end to end
#   make test   create the environment if missing, install, run every test
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install demo test test-unit lock clean server server-stop

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

demo: install
	$(VENV)/bin/attnrl demo

test: install
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q

test-unit: install
	OMP_NUM_THREADS=1 $(PY) -m pytest -q tests/unit

# Re-pin after changing dependencies in pyproject.toml.
lock: install
	{ head -2 requirements.lock; $(PY) -m pip freeze --exclude-editable | grep -vi '^attnrl' | sed 's/^torch==\(.*\)+cpu/torch==\1/'; } > requirements.lock.new
	mv requirements.lock.new requirements.lock

# A local Prefect server on 127.0.0.1:4200 (UI included) with the prefect.yaml deployments registered and a
# worker polling the attnrl-process pool; logs and PIDs in .prefect-server/. See scripts/prefect_server.sh.
server: install
	VENV=$(VENV) scripts/prefect_server.sh start

server-stop:
	VENV=$(VENV) scripts/prefect_server.sh stop

clean:
	rm -rf data models runs reports .pytest_cache
