# The two commands a fresh machine needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export RAY_AUTH_MODE ?= disabled
export RAY_USAGE_STATS_ENABLED ?= 0
# e.g. `make demo DEMO_ARGS=--all` for all 70,000 Fashion-MNIST images, or
# `make demo DATA=/path/to/tiny-imagenet-200` for your own photos (devise demo --data)
DEMO_ARGS ?=

.PHONY: setup demo test test-fast test-quick bench lint clean gpu-wheels wheel check-wheel lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt scripts/setup.sh
	bash scripts/setup.sh $(VENV)
	touch $@

demo: setup
	$(PY) -m devise demo --out runs/demo $(if $(DATA),--data $(DATA)) $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -q

# Without the multi-node cluster tests (tests/test_cluster.py: minutes of node starts and losses).
test-quick: setup
	$(PY) -m pytest -q -m "not cluster"

# The tests that start no Ray cluster and no process (tests/conftest.py skips one that tries).
test-fast: setup
	DEVISE_TEST_FAST=1 $(PY) -m pytest -q -m "not ray and not slow"

bench: setup
	$(PY) bench/run_all.py

lint: setup
	$(VENV)/bin/ruff check devise jobs tests bench
	$(VENV)/bin/ruff format --check devise jobs tests bench

clean:
	rm -rf $(VENV) .pytest_cache dist build

# An sdist and a wheel built from it (so the sdist is proven complete) in dist/.
wheel: setup
	rm -rf dist build
	source scripts/uv.sh && "$$UV" build --quiet --python $(PY) "$${FIND_LINKS[@]}" --out-dir dist
	@ls dist

# The wheel in a fresh virtual environment outside the checkout: --help, package files, and
# catalog -> embed --local -> search on generated images (scripts/check_wheel.sh).
check-wheel: wheel
	bash scripts/check_wheel.sh

# Regenerate constraints.txt (the exact tested versions) after changing pyproject.toml.
lock:
	bash scripts/lock.sh

# Wheels of the pure-Python EfficientNet-Lite architecture, to carry to a GPU machine without an index.
gpu-wheels: setup
	$(PY) -m pip --version >/dev/null 2>&1 && $(PY) -m pip download -q --no-deps -d bench/.wheels efficientnet-lite-pytorch==0.1.0 \
		|| pip download -q --no-deps -d bench/.wheels efficientnet-lite-pytorch==0.1.0
