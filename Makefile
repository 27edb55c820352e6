# hicmae-dist: `make demo` runs the main job on its default, `make test` runs the suite.
# Both set everything up first (apt packages, venv, pinned wheels, the native extension),
# idempotently: a second run skips what is done.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hicmae-setup
# The CUDA build of torch from PyPI (`===` skips the CPU-only file some machines carry):
# torchaudio and torchcodec are built against it; it runs on the CPU too.
TORCH_PINS := "torch===2.13.0" torchaudio==2.11.0 torchcodec==0.17.0
APT_PACKAGES := ffmpeg
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/hicmae-dist/torch_extensions
export PIP_DISABLE_PIP_VERSION_CHECK := 1
DEMO_DIR ?= runs/demo
DEMO_CLIPS ?= 256
PYTEST_ARGS ?=
# pytest-xdist workers: one per core, at most 4 (each holds torch and runs multi-process tests).
# Whole modules go to a worker (their fixtures are built once), slow ones first (tests/conftest.py).
# PYTEST_WORKERS=0 runs the suite in this process.
PYTEST_WORKERS ?= $(shell n=$$(nproc 2>/dev/null || echo 1); if [ $$n -gt 4 ]; then n=4; elif [ $$n -lt 2 ]; then n=0; fi; echo $$n)

.PHONY: setup demo demo-finetune lint test install-check clean
setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*)
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then echo "apt-get install$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(TORCH_PINS)
	$(BIN)/pip install -q --no-build-isolation -e ".[dev,faces]"
	$(BIN)/python -c "from hicmae_dist.ops import gather as g; assert g.native_available(), 'hicmae_dist._C did not build'; \
	  print(g.native_build())"
	touch $@

$(DEMO_DIR)/corpus/labels.csv: | $(STAMP)
	$(BIN)/hicmae-dist synth --out $(DEMO_DIR)/corpus --clips $(DEMO_CLIPS)

$(DEMO_DIR)/shards/manifest.json: $(DEMO_DIR)/corpus/labels.csv
	$(BIN)/hicmae-dist prepare --src $(DEMO_DIR)/corpus --out $(DEMO_DIR)/shards

demo: setup $(DEMO_DIR)/shards/manifest.json
	rm -rf $(DEMO_DIR)/run
	$(BIN)/hicmae-dist pretrain --preset tiny-cpu --data $(DEMO_DIR)/shards --run-dir $(DEMO_DIR)/run

# After `make demo`: fine-tune its weights on a synthetic emotion-like set (3 subject-independent
# folds, validation-selected and last epoch, mean and std), then video<->audio retrieval.
$(DEMO_DIR)/downstream/splits/split03/test.csv: | $(STAMP)
	$(BIN)/hicmae-dist synth --downstream --out $(DEMO_DIR)/downstream --clips 48 --speakers 12 --folds 3

demo-finetune: setup $(DEMO_DIR)/downstream/splits/split03/test.csv
	test -f $(DEMO_DIR)/run/summary.json || $(MAKE) demo
	rm -rf $(DEMO_DIR)/finetune
	$(BIN)/hicmae-dist finetune --preset finetune-tiny-cpu --splits $(DEMO_DIR)/downstream/splits --folds 1-3 \
	  --pretrained $(DEMO_DIR)/run --run-dir $(DEMO_DIR)/finetune finetune.num_outputs=4
	$(BIN)/hicmae-dist eval retrieval --weights $(DEMO_DIR)/run --annotations $(DEMO_DIR)/downstream/splits/split01/test.csv

# ruff (configured in pyproject.toml): seconds, so it runs before the suite.
lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# pytest exits 5 when a selection (PYTEST_ARGS=-k ...) collects nothing: say so, not a failure.
test: setup lint
	@rc=0; $(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile --no-loadscope-reorder $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected for '$(PYTEST_ARGS)'"; rc=0; fi; exit $$rc

# `pip install .` and `python -m build` outside the Makefile, in a fresh venv (.ci/install-check).
install-check:
	bash .ci/install-check

clean:
	rm -rf build *.egg-info hicmae_dist/_C*.so runs
