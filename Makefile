# The two set-up commands of the README: `make sandbox` and `make test`.
# Both create .venv, install the project into it, and build (or reuse) the local Kubernetes tools.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: sandbox test tools lint bench

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

bench: tools
	$(BIN)/python benchmarks/fleet.py $(ARGS)
