# str-hooks developer commands. `make demo` and `make test` work on a fresh clone: each creates .venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Strict editable install: a link tree under build/ mirrors the installed layout (schemas/ and
# integrations/ as str_hooks.schemas / str_hooks.integrations); new files need a reinstall, hence the
# source list in the stamp's prerequisites.
SOURCES := $(shell find str_hooks schemas integrations -type f \( -name '*.py' -o -name '*.txt' \) 2>/dev/null)
STAMP := $(VENV)/.str-hooks-installed
# Axolotl 0.19 pins transformers, peft, trl and pydantic versions other than .venv's: its own environment,
# built once (about 4 GB, a few minutes), with str-hooks installed into it without touching those pins.
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_BIN := $(AXOLOTL_VENV)/bin
AXOLOTL_DEPS := $(AXOLOTL_VENV)/.axolotl-installed
AXOLOTL_STAMP := $(AXOLOTL_VENV)/.str-hooks-installed
export PYTHONUNBUFFERED := 1

.PHONY: install axolotl-venv lint typecheck test demo study clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt $(SOURCES)
	# torch first, pinned: this machine's CPU build; an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,hf]' --config-settings editable_mode=strict
	touch $@

install: $(STAMP)

$(AXOLOTL_BIN)/python:
	$(PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_BIN)/python -m pip install -q --upgrade pip

$(AXOLOTL_DEPS): $(AXOLOTL_BIN)/python constraints-axolotl.txt
	# torch first, pinned (the CPU build), so that axolotl keeps it instead of pulling a CUDA build.
	$(AXOLOTL_BIN)/pip install -q torch==2.13.0
	$(AXOLOTL_BIN)/pip install -q -c constraints-axolotl.txt axolotl==0.19.0
	touch $@

$(AXOLOTL_STAMP): $(AXOLOTL_DEPS) pyproject.toml $(SOURCES)
	$(AXOLOTL_BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict
	touch $@

axolotl-venv: $(AXOLOTL_STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	cd build/__editable__.str_hooks-*-py3-none-any && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p str_hooks

test: lint typecheck axolotl-venv
	$(BIN)/pytest

# The README's main job: build a small aligned test model from the project's own texts, fine-tune it with
# and without STR, print the before/after table and write the plot (runs/demo/), in a few minutes on CPU.
demo: install
	$(BIN)/python -m study demo --out runs/demo

# The efficacy study on ../shared/data (AdvBench, XSTest, GSM8K): about an hour on a 2-core CPU.
study: install
	$(BIN)/python -m study run --out results/study

clean:
	rm -rf $(VENV) $(AXOLOTL_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
