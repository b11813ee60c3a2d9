# Paymaster: every set-up step lives here so a fresh machine needs only `make run` / `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export PAYMASTER_TEST_PG ?= postgresql://postgres@127.0.0.1:5432/test

.PHONY: venv run test test-fast lint fmt bench soak clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Initialise the embedded database (idempotent), then serve the authority and gateway.
run: venv
	$(VENV)/bin/paymaster init
	$(VENV)/bin/paymaster serve

test: venv
	$(PY) -m pytest -n 2 --dist loadgroup -m "not soak" -q
	$(MAKE) lint

test-fast: venv
	$(PY) -m pytest -x -q -m "not slow and not soak"

lint: venv
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/ruff format --check src tests bench
	$(VENV)/bin/mypy

fmt: venv
	$(VENV)/bin/ruff format src tests bench
	$(VENV)/bin/ruff check --fix src tests bench

bench: venv
	$(PY) -m bench

soak: venv
	$(PY) -m pytest -m soak -q -p no:randomly

clean:
	rm -rf $(VENV) .paymaster build *.egg-info
