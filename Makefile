# One entry point per job. Each target first makes sure the environment exists:
# .venv is created when missing; torch 2.13.0 (a CPU build on this machine's disk) is
# installed first only when no torch is importable, so an existing torch (Colab, a CUDA
# build) is never re-pinned; then the package (with nbconvert for `make book`). The test
# extra (pytest, nbmake, Playwright, Voila, check-jsonschema) is added by the targets that need it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
NAME   ?= main
PYTEST_ARGS ?=

.PHONY: setup setup-test test run book nbmake bench bench-fast calibrate clean-venv sync-notebooks colab-links sweep report
STUDY ?= table1,table3,table2,ablations
SEEDS ?= 3
SWEEP ?= runs/sweep/phantom-v3

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[book]"
	@touch $@

setup-test: $(VENV)/.installed-test

$(VENV)/.installed-test: $(VENV)/.installed pyproject.toml
	$(BIN)/python -m pip install -q -e ".[test]"
	@touch $@

# The test command (README, .ci/run). pytest exits 5 when it collects no test: that fails too.
test: setup-test
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The main job: every notebook headless on the embedded phantom -> runs/$(NAME)/. Incremental: a
# notebook re-runs only when its content stamp (its .py, the trm_utils modules it imports, its
# parameters) changed; FORCE=1 re-runs all. A failed notebook is named with its reason as it fails; the
# run then ends non-zero (KEEP_GOING=1: the notebooks not yet begun still run).
FORCE ?=
KEEP_GOING ?=
run: setup
	$(BIN)/python -m trm_utils.run_all --name $(NAME) $(if $(FORCE),--force,) $(if $(KEEP_GOING),--keep-going,)

# The executed tutorial as a static site: runs/$(NAME)/*.ipynb (outputs included, never re-executed)
# -> runs/book/ (open runs/book/index.html); `make run` first.
book: setup
	$(BIN)/python -m trm_utils.book --run runs/$(NAME) --out runs/book

# The notebooks exactly as committed (default parameters), through nbmake.
nbmake: setup-test
	$(BIN)/python -m pytest -q --nbmake --nbmake-timeout=1800 notebooks/

bench: setup
	$(BIN)/python benchmarks/bench.py --out runs/bench/bench.json

bench-fast: setup
	$(BIN)/python benchmarks/bench.py --fast --out runs/bench/bench-fast.json

# Regenerate every .ipynb from its .py source (outputs stripped).
sync-notebooks: setup
	$(BIN)/jupytext --sync notebooks/*.py

clean-venv:
	rm -rf $(VENV)

# How the phantom is calibrated (vanilla Dice vs the paper's range; same- vs cross-modality)
calibrate: setup
	$(BIN)/python benchmarks/calibrate_phantom.py

# Point every Colab badge and setup cell at the repository: REPO=owner/name sets it in
# pyproject.toml ([project.urls] Repository) first; without REPO, pyproject's URL is re-applied.
colab-links: setup
	@if [ -n "$(REPO)" ]; then $(BIN)/python -m trm_utils.colab set "$(REPO)"; else $(BIN)/python -m trm_utils.colab apply; fi

# The paper's tables on the phantom (tutorial preset, 3 seeds; resumable: run it again after a kill)
# then the report; e.g. `make sweep STUDY=table1 SEEDS=5 SWEEP=runs/sweep/t1`.
sweep: setup
	$(BIN)/python -m trm_utils.sweep run --study $(STUDY) --dataset phantom --seeds $(SEEDS) --out $(SWEEP)
	$(BIN)/python -m trm_utils.sweep report $(SWEEP)

report: setup
	$(BIN)/python -m trm_utils.sweep report $(SWEEP)
