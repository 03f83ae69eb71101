# Spatial Dependency Networks: reproducibility pipeline.
# `make` installs and runs the default (offline) experiments; `make test` installs and runs the tests.

SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export DVC_NO_ANALYTICS := 1
# stages run `python`: the project's interpreter must come first on PATH
export PATH := $(abspath $(BIN)):$(PATH)
DVC := $(BIN)/dvc

DEFAULT_DATASETS := photos32 sprites
PAPER_DATASETS := cifar10 imagenet32 celebahq256 3dshapes
DATASETS := $(DEFAULT_DATASETS) $(PAPER_DATASETS)

.DEFAULT_GOAL := all

# What every target that runs experiments ends with: the summary and the comparison picture alone
# (DVC stages that read every enabled run's committed eval.json and val.csv), then the README's
# table, a copy of metrics/summary.md made outside DVC (README.md is no stage's output).
define finish
$(DVC) repro --single-item summary comparison
$(BIN)/python -m sdn readme
endef
.PHONY: all help install lock test test-slow lint bench gpu-check metrics diff plots summary readme showcase \
	celebahq256-release \
	$(DATASETS)

# `make` rebuilds the enabled runs except the opt-in showcase (an hour more: `make showcase`); the
# summary then reads every enabled run's committed eval.json, so it is rebuilt on its own.
all: install ## Install, then rebuild the enabled experiments (dvc.yaml; photos32, sprites) and the summary
	targets="$$($(BIN)/python -m sdn pipeline targets)" && $(DVC) repro $$targets
	$(finish)

help: ## List the targets
	@grep -hE '^[a-zA-Z0-9_ -]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | sort | \
		awk -F"\t" '{printf "  %-20s %s\n", $$1, $$2}'
	@echo "  <dataset>            Run one dataset's experiments (SDN and CNN): $(DATASETS)"

install: $(STAMP) ## Create .venv and install the locked dependencies (requirements.lock), then the project

# requirements.lock pins every transitive dependency with its hashes: the same environment on every
# machine and every year. The project itself goes in editable, without touching the locked set.
$(STAMP): pyproject.toml requirements.lock
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --require-hashes -r requirements.lock
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	@touch $@

# uv does not read pip's configuration: it is handed the same extra indexes and wheel folders, and
# like pip considers every index for every package.
PIP_SETTING = $(shell $(BIN)/python -m pip config get global.$(1) 2>/dev/null)
lock: ## Re-resolve requirements.lock from pyproject.toml (after changing a dependency), then `make install`
	@test -x $(BIN)/uv || { echo "uv missing: run make install first"; exit 1; }
	UV_INDEX_STRATEGY=unsafe-best-match \
	$(if $(call PIP_SETTING,extra-index-url),UV_EXTRA_INDEX_URL="$(call PIP_SETTING,extra-index-url)") \
	$(if $(call PIP_SETTING,find-links),UV_FIND_LINKS="$(call PIP_SETTING,find-links)") \
	$(BIN)/uv pip compile pyproject.toml --extra dev --generate-hashes --quiet \
		--python $(BIN)/python --custom-compile-command "make lock" -o requirements.lock

test: install ## Run the test suite (slow tests excluded)
	$(BIN)/python -m pytest -m "not slow"

test-slow: install ## Run only the slow tests
	$(BIN)/python -m pytest -m slow

lint: install ## Check code style with ruff
	$(BIN)/ruff check sdn stages tests benchmarks

bench: install ## Run the benchmarks (SDN layer against a per-line loop; LMDB loader; SDN vs CNN step time)
	$(BIN)/python benchmarks/sdn_layer.py
	$(BIN)/python benchmarks/data_loader.py
	$(BIN)/python benchmarks/step_time.py photos32-sdn
	$(BIN)/python benchmarks/step_time.py sprites-sdn

# Without CUDA it says so and does nothing; on one H100 it takes under 10 minutes.
gpu-check: install ## On a GPU: tiny dvc repro on CUDA, then each paper preset's step time, memory and GPU-hours (benchmarks/gpu_check.json)
	$(BIN)/python benchmarks/gpu_check.py

metrics: install ## Show the committed metrics as a markdown table
	$(DVC) metrics show --md

diff: install ## Compare metrics with another commit: make diff REV=HEAD~1
	$(DVC) metrics diff $(or $(REV),HEAD) --md

plots: install ## Render curves, SDN-vs-CNN comparisons and sample grids (dvc_plots/index.html); redraw metrics/comparison.png
	$(DVC) plots show
	$(DVC) repro --single-item comparison

# Enabling a dataset adds its experiments to dvc.yaml (commit it with the results): from then on
# `dvc repro`, `dvc status`, metrics, plots and the summary include them. The download runs once
# outside DVC first, so that the registry stays as it was until it succeeds (a checksum to pin,
# no network); DVC's own download stage then finds the verified file and records it.
$(DATASETS): install
	$(BIN)/python stages/download.py $@
	$(BIN)/python -m sdn pipeline enable $@
	$(DVC) repro $(foreach e,$@-sdn $@-cnn,evaluate@$(e) sample@$(e))
	$(finish)

SHOWCASE := photos32-long-sdn photos32-long-cnn
showcase: install ## The photos32 SDN/CNN pair trained 7.5x longer (about an hour on 2 cores), then the summary
	$(BIN)/python -m sdn pipeline enable $(SHOWCASE)
	$(DVC) repro $(foreach e,$(SHOWCASE),evaluate@$(e) sample@$(e))
	$(finish)

# The import runs once outside DVC first, so that a missing checkpoint ends with its one-line error.
celebahq256-release: install ## Evaluate and sample the authors' CelebAHQ256 checkpoint (see README)
	$(BIN)/python stages/release.py $@
	$(BIN)/python -m sdn pipeline enable $@
	$(DVC) repro evaluate@$@ sample@$@
	$(finish)

readme: install ## Copy the results table of metrics/summary.md into README.md
	$(BIN)/python -m sdn readme

summary: install ## Rebuild metrics/summary.{md,csv} and comparison.png from the enabled experiments, and the README's table
	$(DVC) repro summary comparison
	$(BIN)/python -m sdn readme
