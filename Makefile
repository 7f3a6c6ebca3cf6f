# medfed: `make demo` and `make test` create the virtual environment on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test test-quick bench env clean

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first, so nothing below pulls a different (multi-GB) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(BIN)/medfed demo

# Tests run on every core (pytest-xdist), a module per worker: the end-to-end tests
# mostly wait on processes and loopback, so two of them share two cores well.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadscope

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadscope -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/round_latency.py
	$(BIN)/python benchmarks/data_path.py

clean:
	rm -rf $(VENV) medfed-demo .pytest_cache
