# `make test` and `make demo` set themselves up from a fresh clone: a .venv with the project
# and its dev dependencies, and redis-server (apt-get when missing and root); `make test` also
# Debian's chromium (the console's browser tests) and promtool (the alert rules' tests).
#
# Everything the venv holds comes from requirements/dev.lock (exact versions with hashes, one
# universal lock for every Python the package claims); nothing is resolved at install time.
# `make lock` re-resolves it on purpose (after editing pyproject.toml: keeps the other pins;
# `make lock UPGRADE=1`: the newest of everything the ranges admit).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
LOCK := requirements/dev.lock
STAMP := $(VENV)/.installed
# what make test-pythons builds its venvs with (pyenv's shims on these machines)
PYTHONS ?= python3.11 python3.12 python3.13

.PHONY: test lint format typecheck pytest redis-server venv versions lock bench soak demo clean \
	test-latest test-oldest test-pythons scan-venv chromium promtool rules

test: versions lint typecheck rules pytest

venv: $(STAMP)

# The policy scanner (checkov) that tests/deploy/test_scanner.py runs on the rendered manifests
# and the Dockerfile: its own venv from its own hashed lock (its ~100 dependencies pin versions
# of their own, kept apart from the project's); rebuilt when the lock changes.
SCAN_VENV := .venv-scan
SCAN_LOCK := requirements/scan.lock
SCAN_STAMP := $(SCAN_VENV)/.installed
scan-venv: $(SCAN_STAMP)

$(SCAN_STAMP): $(SCAN_LOCK)
	rm -rf $(SCAN_VENV)
	$(PYTHON) -m venv $(SCAN_VENV)
	$(SCAN_VENV)/bin/python -m pip install -qq --disable-pip-version-check --require-hashes \
	  --no-deps -r $(SCAN_LOCK)
	$(SCAN_VENV)/bin/python -m pip check
	touch $(SCAN_STAMP)

# The stamp follows the lock: a changed lock rebuilds the venv from nothing, so a package the
# lock dropped cannot linger. pip installs the lock with --require-hashes --no-deps (the lock
# is complete), then the project itself, editable, built by the locked hatchling.
$(STAMP): $(LOCK) pyproject.toml
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -qq --disable-pip-version-check --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip uninstall -qq -y setuptools  # 3.11's venv brings it; the lock does not hold it
	$(PY) -m pip install -qq --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

# What this run tests with, printed first by CI.
versions: venv redis-server
	@$(PY) .ci/deps.py versions

UPGRADE ?=
lock: venv
	$(VENV)/bin/uv pip compile pyproject.toml requirements/tools.in --extra dev --extra lint \
	  --universal --python-version 3.11 --generate-hashes --quiet $(if $(UPGRADE),--upgrade) \
	  -o $(LOCK)
	$(VENV)/bin/uv pip compile pyproject.toml requirements/image.in --extra publisher --extra yaml \
	  --universal --python-version 3.11 --generate-hashes --quiet $(if $(UPGRADE),--upgrade) \
	  -o requirements/image.lock
	$(VENV)/bin/uv pip compile requirements/scan.in \
	  --universal --python-version 3.11 --generate-hashes --quiet $(if $(UPGRADE),--upgrade) \
	  -o $(SCAN_LOCK)
	@echo "$(LOCK), requirements/image.lock and $(SCAN_LOCK) written; commit them" \
	  "(make venv / make scan-venv rebuild the venvs)"

# The Redis-facing suites (and mypy) against the newest / the lowest runtime versions that
# pyproject.toml's ranges admit, each in its own venv; test tools stay at their locked versions.
# Not part of make test: run them before a release and when a dependency publishes a release.
test-latest: venv redis-server
	$(PY) .ci/deps.py end latest
test-oldest: venv redis-server
	$(PY) .ci/deps.py end oldest

# The whole suite on every Python the package claims, each in .venv-pythonX.Y from the lock.
test-pythons: venv redis-server scan-venv
	$(PY) .ci/deps.py pythons $(PYTHONS)

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

# The console's browser tests drive Debian's chromium through Playwright (which cannot download
# a browser of its own here); --no-install-recommends keeps it to the browser.
chromium:
	@if [ ! -x /usr/bin/chromium ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium with apt-get"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	      chromium >/dev/null; \
	  else \
	    echo "/usr/bin/chromium is missing: install it (Debian: sudo apt-get install chromium)" \
	         "and run make again" >&2; \
	    exit 1; \
	  fi; \
	fi

# promtool (alert rules: check and unit tests) from Debian's prometheus package: only the
# binary, extracted into the venv, so no Prometheus service is installed or started. One on
# PATH is used as it is.
PROMTOOL := $(VENV)/bin/promtool
promtool: venv
	@if ! command -v promtool >/dev/null 2>&1 && [ ! -x $(PROMTOOL) ]; then \
	  if ! command -v apt-get >/dev/null 2>&1; then \
	    echo "promtool is missing: install it (Debian: apt-get install prometheus; or" \
	         "prometheus.io/download) and run make again" >&2; \
	    exit 1; \
	  fi; \
	  echo "extracting promtool from Debian's prometheus package into $(PROMTOOL)"; \
	  tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  { (cd "$$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) || \
	    { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get update -qq && \
	      (cd "$$tmp" && apt-get download -qq prometheus >/dev/null 2>&1); }; } && \
	  dpkg-deb -x "$$tmp"/prometheus_*.deb "$$tmp/root" && \
	  install -m 755 "$$tmp/root/usr/bin/promtool" $(PROMTOOL); \
	fi

# The alert rules: valid, and their unit tests pass (deploy/monitoring/tests).
rules: promtool
	@tool=$$(command -v promtool || echo $(PROMTOOL)); \
	  $$tool check rules deploy/monitoring/rules.yaml && \
	  $$tool test rules deploy/monitoring/tests/rules-test.yaml

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

typecheck: venv
	$(VENV)/bin/mypy

# The suite on PYTEST_WORKERS processes (pytest-xdist; it mostly waits on Redis and its own
# subprocesses, so more processes than cores pay), tests sharing a module-scoped fixture on
# one of them; then the tests marked quiet (timing and CPU bounds) alone. PYTEST_WORKERS=0:
# everything in one process. `.venv/bin/python -m pytest` runs it all serially.
PYTEST_WORKERS ?= 3
pytest: venv redis-server scan-venv chromium promtool
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -m "not soak and not quiet"
	$(PY) -m pytest -m "quiet and not soak"

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
	rm -rf $(VENV) .venv-* .mypy_cache .ruff_cache .pytest_cache .hypothesis
