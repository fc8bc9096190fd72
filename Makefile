# Semi-supervised medical image segmentation benchmark. `make help` lists the targets.
# Every target sets up its own environment (.venv) on first use; nothing needs installing by hand.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# Variables of one run (the same as the options of `python -m benchmark run`).
METHOD ?= supervised
DATASET ?= synthetic_acdc
DATA_ROOT ?=
RATIO ?= 0.2
LABELED ?=
PROFILE ?= cpu
SEED ?= 0
DEVICES ?= 1
# auto | cpu | gpu, and 32-true | bf16-mixed | 16-mixed (GPU) ...; empty = the config's (auto, 32-true).
ACCELERATOR ?=
PRECISION ?=
OUT ?= runs
LEADERBOARD_DIR ?= leaderboards
WANDB ?= disabled
OVERRIDES ?=
PYTEST_ARGS ?=
# Hyperparameter search (make tune) and training with its best trial (make bench FROM_STUDY=runs/tune/<study>).
TRIALS ?= 20
WORKERS ?= 1
STORAGE ?=
STUDY ?=
FROM_STUDY ?=
# An interrupted run folder to continue (make bench RESUME=runs/<dataset>/<method>/<run>): its config.yaml holds the run's variables.
RESUME ?=
# Variables of a sweep (`python -m benchmark sweep`): the grid, a shard of it and where its runs execute.
METHODS ?= supervised
RATIOS ?= $(RATIO)
SEEDS ?= 0 1 2
SHARD ?=
LAUNCHER ?= local
SWEEP_ARGS ?=
PERF_ARGS ?=
# make gpu-check: DEVICE=cpu for the dry run without a GPU; GPU_CHECK_ARGS e.g. --methods cps --steps 40.
DEVICE ?=
GPU_CHECK_ARGS ?=

RUN_ARGS = --method $(METHOD) --dataset $(DATASET) --profile $(PROFILE) --seed $(SEED) --devices $(DEVICES) \
	--out "$(OUT)" --leaderboard-dir "$(LEADERBOARD_DIR)" --wandb $(WANDB) \
	$(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") $(if $(LABELED),--labeled $(LABELED),--ratio $(RATIO)) \
	$(if $(ACCELERATOR),--accelerator $(ACCELERATOR)) $(if $(PRECISION),--precision $(PRECISION)) \
	$(foreach o,$(OVERRIDES),--set $(o))
# With RESUME, only the variables set on the command line or in the environment are passed: the run folder holds the rest.
given = $(filter command environment,$(firstword $(origin $(1))))
RESUME_ARGS = $(if $(call given,METHOD),--method $(METHOD)) $(if $(call given,DATASET),--dataset $(DATASET)) \
	$(if $(call given,PROFILE),--profile $(PROFILE)) $(if $(call given,SEED),--seed $(SEED)) \
	$(if $(call given,DEVICES),--devices $(DEVICES)) $(if $(call given,OUT),--out "$(OUT)") \
	$(if $(call given,LEADERBOARD_DIR),--leaderboard-dir "$(LEADERBOARD_DIR)") $(if $(call given,WANDB),--wandb $(WANDB)) \
	$(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") $(if $(LABELED),--labeled $(LABELED),$(if $(call given,RATIO),--ratio $(RATIO))) \
	$(if $(ACCELERATOR),--accelerator $(ACCELERATOR)) $(if $(PRECISION),--precision $(PRECISION)) \
	$(foreach o,$(OVERRIDES),--set $(o))

.DEFAULT_GOAL := help
.PHONY: help setup bench sweep leaderboard tune show-config verify test test-fast list clean perf predict gpu-check

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'
	@echo "  variables: METHOD DATASET DATA_ROOT RATIO|LABELED PROFILE(paper|cpu|smoke) SEED DEVICES ACCELERATOR(auto|cpu|gpu) PRECISION OUT LEADERBOARD_DIR WANDB OVERRIDES"
	@echo "  tune: TRIALS WORKERS STORAGE(sqlite|journal|postgresql://...) STUDY; bench: FROM_STUDY RESUME(an interrupted run folder)"
	@echo "  sweep:     METHODS RATIOS SEEDS SHARD(i/n) LAUNCHER(local|slurm|submitit-local) SWEEP_ARGS (e.g. --slurm-partition gpu)"

$(STAMP): setup.cfg pyproject.toml
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH"; exit 2; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install the suite with its dependencies

bench: $(STAMP) ## train and test one run, e.g. make bench METHOD=supervised RATIO=0.2 (synthetic data by default)
	$(PY) -m benchmark run $(if $(RESUME),$(RESUME_ARGS) --resume "$(RESUME)",$(RUN_ARGS)) $(if $(FROM_STUDY),--from-study "$(FROM_STUDY)")

tune: $(STAMP) ## Optuna search on validation Dice, e.g. make tune METHOD=cps RATIO=0.1 TRIALS=50 WORKERS=2
	$(PY) -m benchmark tune $(RUN_ARGS) --trials $(TRIALS) --workers $(WORKERS) \
		$(if $(STORAGE),--storage "$(STORAGE)") $(if $(STUDY),--study-name "$(STUDY)")

sweep: $(STAMP) ## run the grid METHODS x RATIOS x SEEDS, skipping what the leaderboard holds, e.g. make sweep DATASET=acdc METHODS="supervised mean_teacher" RATIOS="0.05 0.1"
	$(PY) -m benchmark sweep --dataset $(DATASET) --methods $(METHODS) --ratios $(RATIOS) --seeds $(SEEDS) \
		--profile $(PROFILE) --devices $(DEVICES) --out "$(OUT)" --leaderboard-dir "$(LEADERBOARD_DIR)" --wandb $(WANDB) \
		--launcher $(LAUNCHER) $(if $(SHARD),--shard $(SHARD)) $(if $(DATA_ROOT),--data-root "$(DATA_ROOT)") \
		$(foreach o,$(OVERRIDES),--set $(o)) $(SWEEP_ARGS)

leaderboard: $(STAMP) ## aggregate leaderboards/*.csv into leaderboards/README.md (mean +- std, Wilcoxon vs supervised) and plots
	$(PY) -m benchmark leaderboard --dir "$(LEADERBOARD_DIR)"

show-config: $(STAMP) ## print the resolved config of the run `make bench` would do
	$(PY) -m benchmark run $(RUN_ARGS) $(if $(FROM_STUDY),--from-study "$(FROM_STUDY)") --show-config

predict: $(STAMP) ## label maps of a folder of images with a trained run: make predict RUN=<run folder> INPUT=<folder> OUTPUT=<folder>
	@test -n "$(RUN)" -a -n "$(INPUT)" -a -n "$(OUTPUT)" || { echo "error: give RUN=<run folder> INPUT=<folder of images> OUTPUT=<folder>"; exit 2; }
	$(PY) -m benchmark predict "$(RUN)" "$(INPUT)" "$(OUTPUT)"

verify: $(STAMP) ## check a dataset folder, e.g. make verify DATASET=acdc DATA_ROOT=../shared/datasets/ACDC
	$(PY) -m benchmark data verify $(DATASET) "$(DATA_ROOT)"

list: $(STAMP) ## list methods, datasets and profiles
	@for what in methods datasets profiles; do echo "$$what:"; $(PY) -m benchmark list $$what | sed 's/^/  /'; done

test: $(STAMP) ## run the whole test suite (uses ../shared/datasets when present)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests not marked slow
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

perf: $(STAMP) ## the suite's own costs as ratios vs same-run references (~20 min on 2 busy cores) -> perf/report.{json,md}
	$(PY) -m benchmark.perf --out perf $(PERF_ARGS)

gpu-check: $(STAMP) ## every method a few dozen steps on one GPU, fp32/16-mixed/bf16-mixed: step time, memory, loss vs CPU (DEVICE=cpu: dry run)
	$(PY) -m benchmark.gpu_check $(if $(DEVICE),--device $(DEVICE)) $(GPU_CHECK_ARGS)

clean: ## remove runs/ and caches (keeps .venv and leaderboards)
	rm -rf runs .pytest_cache
