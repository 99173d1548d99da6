# cloudlab: one-command set-up for the main job and the tests.
# `make campaign` and `make test` create .venv on first use (torch CPU wheel first).
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is installed first, alone: here pip finds a CPU wheel on disk; elsewhere pass
# TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" for the CPU-only build
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
export CLOUDLAB_DATA_DIR ?= $(abspath ../shared/data)

.PHONY: setup setup-dft campaign test test-all lint bench clean

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# GPAW needs system libraries (libxc, OpenBLAS, FFTW, MPI), the Bluesky queueserver a
# redis-server; run as root or with sudo. Also installs the orchestrator adapters' packages.
$(VENV)/.installed-dft: $(VENV)/.installed
	command -v apt-get >/dev/null && { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libxc-dev libopenblas-dev libfftw3-dev libopenmpi-dev redis-server chromium chromium-driver >/dev/null; } || true
	$(PY) -m pip install -q -e ".[dev,dft,orchestrators]"
	touch $@

setup-dft: $(VENV)/.installed-dft

# The main job: a simulated closed-loop campaign on the embedded defaults.
campaign: setup
	$(VENV)/bin/cloudlab run configs/perovskite_water_splitting.yaml --out runs/perovskite_water_splitting

# The default test run (slow tests excluded; dft tests skip when GPAW/CHGNet are absent).
test: setup
	$(PY) -m pytest -m "not slow" -q

test-all: setup-dft
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check cloud_model loop adapters simulators tests benchmarks
	$(VENV)/bin/mypy

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache
