# `make test` and `make demo` set themselves up from a fresh clone: a .venv with the project
# and its dev dependencies, and redis-server (apt-get when missing and root).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test lint format typecheck pytest redis-server venv bench soak demo clean

test: venv redis-server lint typecheck pytest

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev,lint]'
	touch $(STAMP)

# redis-cli builds the Redis Cluster of the cluster tests (Debian: redis-tools, which
# redis-server depends on); sentinels run as redis-server --sentinel.
redis-server:
	@if ! command -v redis-server >/dev/null 2>&1 || ! command -v redis-cli >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing redis-server and redis-tools with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server redis-tools >/dev/null; \
	  else \
	    echo "redis-server or redis-cli is missing: install them (Debian/Ubuntu: sudo apt-get" \
	         "install redis-server redis-tools; macOS: brew install redis) and run make again" >&2; \
	    exit 1; \
	  fi; \
	fi
	@redis-server --version
	@redis-cli --version

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: venv
	$(VENV)/bin/mypy

pytest: venv redis-server
	$(PY) -m pytest

# Benchmarks print side-by-side tables and write JSON to bench-results/ (not part of make test).
bench: venv redis-server
	$(PY) -m tests.benchmarks

# The long fault/stress runs; SOAK_SEED and SOAK_SECONDS make them reproducible and longer.
SOAK_SEED ?= 1
SOAK_SECONDS ?= 300
soak: venv redis-server
	SOAK_SEED=$(SOAK_SEED) SOAK_SECONDS=$(SOAK_SECONDS) $(PY) -m pytest -m soak -p no:cacheprovider

demo: venv redis-server
	$(PY) -m publisher demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
