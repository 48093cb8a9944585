# emrwatch: the commands of CONTRACTS §1.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench lint format clean chromium slapd

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 | grep -v '^WARNING: Location' || true
	@$(BIN)/python -c "import detectors, pipeline, connectors, models, emrwatch" 
	@touch $(STAMP)

demo: setup
	$(BIN)/emrwatch demo

# Debian packages the tests use, installed once (silent when the program is there):
# $(call deb,PROGRAM,PACKAGE,WHAT FOR)
deb = @if [ ! -x $(1) ]; then \
	  echo "make: installing Debian $(2) for $(3)" >&2; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(2) >/dev/null; \
	fi

# The browser tests drive Debian's chromium through Playwright (which cannot download
# browsers here).
chromium:
	$(call deb,/usr/bin/chromium,chromium,the browser tests)

# The feed's directory login is tested against a real OpenLDAP server (Debian's slapd,
# started by the tests on loopback; the package's own service is not used).
slapd:
	$(call deb,/usr/sbin/slapd,slapd,the directory login tests)

# two processes, a test file each at a time (its module fixtures stay in one): most
# tests wait on brokers, workers and browsers, so two run in about half the time
test: setup chromium slapd
	$(BIN)/pytest -q -n 2 --dist loadfile --durations=15

bench: setup
	$(BIN)/emrwatch bench

# every package type-checks clean (the per-event path, too, so a compiler that trusts the
# hints, mypyc (README: Performance), needs no more than that)
TYPED = connectors detectors emrwatch models pipeline

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy --ignore-missing-imports $(TYPED)

format: setup
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
