# str-hooks developer commands. `make demo` and `make test` work on a fresh clone: each creates .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Strict editable install: a link tree under build/ mirrors the installed layout (schemas/ and
# integrations/ as str_hooks.schemas / str_hooks.integrations); new files need a reinstall, hence the
# source list in the stamp's prerequisites.
SOURCES := $(shell find str_hooks schemas integrations -type f \( -name '*.py' -o -name '*.txt' \) 2>/dev/null)
STAMP := $(VENV)/.str-hooks-installed
export PYTHONUNBUFFERED := 1

.PHONY: install lint typecheck test demo clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt $(SOURCES)
	# torch first, pinned: this machine's CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,hf]' --config-settings editable_mode=strict
	touch $@

install: $(STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	cd build/__editable__.str_hooks-*-py3-none-any && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p str_hooks

test: lint typecheck
	$(BIN)/pytest

demo: install
	$(BIN)/python -m str_hooks.demo

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
