# The two set-up commands of the README: `make sandbox` and `make test`.
# Both create .venv, install the project into it, and build (or reuse) the local Kubernetes tools.
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

sandbox: tools
	$(BIN)/gpu-provisioner sandbox $(ARGS)

lint: $(BIN)/gpu-provisioner
	$(BIN)/ruff check .

test: tools lint
	$(BIN)/pytest $(PYTEST_ARGS)

# Kaito's own workspace controller against gpu-provisioner (tests/interop). `make test` runs the tier too,
# but skips it without a Kaito in KAITO_INTEROP_DIR; here a missing Kaito is an error.
interop: tools
	KAITO_INTEROP_REQUIRED=1 $(BIN)/pytest -m interop tests/interop $(PYTEST_ARGS)

bench: tools
	$(BIN)/python benchmarks/fleet.py $(ARGS)

chaos: tools
	$(BIN)/python -m tests.integration.chaos $(ARGS)

# The Dockerfile, built with a Docker engine when one runs, else with podman (installed from Debian when
# missing) and a stand-in for the base image; tests/integration/test_image.py runs what it builds.
image: $(BIN)/gpu-provisioner
	$(BIN)/gpu-provisioner devenv image $(ARGS)

bench-image: tools
	$(BIN)/python benchmarks/image.py $(ARGS)
