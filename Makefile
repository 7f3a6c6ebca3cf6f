# medfed: `make demo` and `make test` create the virtual environment on first use.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed-stamp
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: demo test test-quick lint bench env clean orthanc chromium mricron-data

$(STAMP): pyproject.toml constraints.txt
	$(PY) -m venv $(VENV)
	# torch first, so nothing below pulls a different (multi-GB) build
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e ".[test]"
	touch $(STAMP)

env: $(STAMP)

# The PACS tests run against a real Orthanc with its DICOMweb plugin; install the
# Debian packages when missing (as root, or through sudo), without starting the
# system service: the tests start their own Orthanc on a free loopback port.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
orthanc:
	@if ! command -v Orthanc >/dev/null 2>&1 || [ ! -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ]; then \
	  echo "installing orthanc and orthanc-dicomweb (the PACS tests need them)"; \
	  had_policy=0; [ -e /usr/sbin/policy-rc.d ] && had_policy=1; \
	  [ $$had_policy = 1 ] || printf '#!/bin/sh\nexit 101\n' | $(SUDO) tee /usr/sbin/policy-rc.d >/dev/null; \
	  $(SUDO) chmod +x /usr/sbin/policy-rc.d; \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends orthanc orthanc-dicomweb >/dev/null ) \
	    || echo "could not install orthanc: the PACS tests will be skipped"; \
	  [ $$had_policy = 1 ] || $(SUDO) rm -f /usr/sbin/policy-rc.d; \
	fi

# The dashboard's browser tests drive a real headless Chromium through Debian's
# chromedriver (never one Selenium would download); install both when missing.
chromium:
	@if ! command -v chromium >/dev/null 2>&1 || [ ! -x /usr/bin/chromedriver ]; then \
	  echo "installing chromium and chromium-driver (the dashboard's browser tests need them)"; \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends chromium chromium-driver >/dev/null ) \
	    || echo "could not install chromium: the dashboard's browser tests will be skipped"; \
	fi

# Public pretraining (and its tests) read the Colin27 brain from Debian's mricron-data
# (MRIcron's templates, BSD-3-clause): another brain than the sites' MNI152. Install
# it when missing.
mricron-data:
	@if [ ! -e /usr/share/mricron/templates/ch2bet.nii.gz ]; then \
	  echo "installing mricron-data (public pretraining reads Colin27 from it)"; \
	  ( $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq \
	      --no-install-recommends mricron-data >/dev/null ) \
	    || echo "could not install mricron-data: the tests that read Colin27 will be skipped"; \
	fi

demo: $(STAMP)
	$(BIN)/medfed demo

# Tests run on every core (pytest-xdist), a module per worker: the end-to-end tests
# mostly wait on processes and loopback, so two of them share two cores well.
# Style first (seconds): ruff's formatter and linter over the whole tree, as pinned.
lint: $(STAMP)
	$(BIN)/ruff format --check --quiet .
	$(BIN)/ruff check --quiet .

test: $(STAMP) lint orthanc chromium mricron-data
	$(BIN)/python -m pytest -n auto --dist loadscope

test-quick: $(STAMP)
	$(BIN)/python -m pytest -n auto --dist loadscope -m "not slow"

bench: $(STAMP)
	$(BIN)/python benchmarks/round_latency.py
	$(BIN)/python benchmarks/data_path.py
	$(BIN)/python benchmarks/dashboard.py

clean:
	rm -rf $(VENV) medfed-demo .pytest_cache
