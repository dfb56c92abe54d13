# The README's two commands: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-done

.PHONY: setup browser demo test lint typecheck pytest bench clean

setup: $(STAMP)

# torch==2.13.0 first: it is the CPU build on this disk; any other request may pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

# Debian's chromium for the dashboard's browser test; installed only when missing (needs root
# or sudo, and apt's package source). Nothing is downloaded by the browser or the tests.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || \
	  { $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q chromium; }
	@chromium --version 2>/dev/null

demo: setup
	$(VENV)/bin/idc-sim demo

PKGS := common client server simulation flowerctl

lint: setup
	$(VENV)/bin/ruff check $(PKGS) tests benchmarks
	$(VENV)/bin/ruff format --check $(PKGS) tests benchmarks

typecheck: setup
	$(VENV)/bin/mypy $(PKGS)

pytest: setup
	$(VENV)/bin/pytest -q

test: lint typecheck pytest

bench: setup
	$(PY) benchmarks/train_throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
