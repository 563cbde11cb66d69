# The two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# e.g. `make demo DEMO_ARGS=--all` for all 70,000 Fashion-MNIST images
DEMO_ARGS ?=

.PHONY: setup demo test bench lint clean gpu-wheels

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(PY) -m devise demo --out runs/demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check devise jobs tests bench
	$(VENV)/bin/ruff format --check devise jobs tests bench

clean:
	rm -rf $(VENV) .pytest_cache

# Wheels of the pure-Python EfficientNet-Lite architecture, to carry to a GPU machine without an index.
gpu-wheels: setup
	$(PY) -m pip --version >/dev/null 2>&1 && $(PY) -m pip download -q --no-deps -d bench/.wheels efficientnet-lite-pytorch==0.1.0 \
		|| pip download -q --no-deps -d bench/.wheels efficientnet-lite-pytorch==0.1.0
