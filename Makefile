# shm-embed: `make run` starts the sidecar and the web service; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-fast bench clean venv

venv: $(STAMP)

$(STAMP): requirements.lock setup.cfg setup.py pyproject.toml $(wildcard shm_protocol/hotpath_c/*)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

run: $(STAMP)
	$(PY) scripts/run.py

test: $(STAMP)
	bash scripts/install_test_services.sh
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

# Unit tests and the integration tests that take seconds: what is marked slow
# (over ~10 s each on 2 cores) or needs CUDA is left out.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow and not cuda" tests

bench: $(STAMP)
	$(PY) bench/protocol_overhead.py
	$(PY) bench/throughput.py
	$(PY) bench/memory.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
