# The two set-up commands of the README: `make sandbox` and `make test`.
# Both create .venv and install the project into it. Each command builds (or reuses) the Go tools it needs on
# first use; `make test` builds them all first (Prometheus included, for the monitoring tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: sandbox test tools lint bench interop chaos image bench-image

$(BIN)/gpu-provisioner: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

tools: $(BIN)/gpu-provisioner
	$(BIN)/gpu-provisioner devenv tools

sandbox: $(BIN)/gpu-provisioner
	$(BIN)/gpu-provisioner sandbox $(ARGS)

lint: $(BIN)/gpu-provisioner
	$(BIN)/ruff check .

test: tools lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Kaito's own workspace controller against gpu-provisioner (tests/interop). `make test` runs the tier too,
# but skips it without a Kaito in KAITO_INTEROP_DIR; here a missing Kaito is an error.
interop: $(BIN)/gpu-provisioner
	KAITO_INTEROP_REQUIRED=1 $(BIN)/pytest -m interop tests/interop $(PYTEST_ARGS)

bench: $(BIN)/gpu-provisioner
	$(BIN)/python benchmarks/suite.py $(or $(ARGS),all)

chaos: $(BIN)/gpu-provisioner
	$(BIN)/python -m tests.integration.chaos $(ARGS)

# The Dockerfile, built with a Docker engine when one runs, else with podman (installed from Debian when
# missing) and a stand-in for the base image; tests/integration/test_image.py runs what it builds.
image: $(BIN)/gpu-provisioner
	$(BIN)/gpu-provisioner devenv image $(ARGS)

bench-image: $(BIN)/gpu-provisioner
	$(BIN)/python benchmarks/image.py $(ARGS)
