# The README's two commands: `make demo` and `make test`. Each sets up everything it needs
# (a venv in .venv, Kafka's jars in the user cache, Debian peers for tests) on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# make demo BOOTSTRAP=host:9092 runs the demo against an existing cluster.
BOOTSTRAP ?=

.PHONY: demo test setup lint wheel-check clean

demo: setup
	$(BIN)/logferry demo $(if $(BOOTSTRAP),--bootstrap-servers $(BOOTSTRAP))

test: setup
	bash .ci/system-deps
	$(BIN)/ruff check .
	bash .ci/wheel-check
	$(BIN)/pytest $(PYTEST_ARGS)

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "logferry needs Python 3.11+ (set PYTHON=python3.11)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

lint: setup
	$(BIN)/ruff check .

wheel-check: setup
	bash .ci/wheel-check

clean:
	rm -rf $(VENV) build dist *.egg-info
