# vizer-recipes. Every target uses .venv, built on first use from requirements.txt.
PYTHON_SYS ?= python3
VENV       ?= .venv
PY         := $(VENV)/bin/python
# torch goes in first so that nothing else pulls a second build; a torch the system Python
# already has (e.g. your CUDA build) is reused through --system-site-packages instead.
TORCH_SPEC ?= torch==2.13.0
RECIPE     ?= tiny-shapes
OUT        ?= outputs/$(RECIPE)
ARGS       ?=
OFFLINE    := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1

RUN        ?= outputs/$(RECIPE)
ADAPTER    ?= $(RUN)/adapter
IMAGES     ?=
REPO       ?=
# GPUS=N (N > 1) or ACCELERATE=<profile> launches through `accelerate launch` with recipes/accelerate/<profile>.yaml
GPUS       ?= 1
ACCELERATE ?= $(if $(filter 1,$(GPUS)),,ddp)
ACCELERATE_ARGS ?=
LAUNCH     := $(if $(ACCELERATE),$(VENV)/bin/accelerate launch --config_file recipes/accelerate/$(ACCELERATE).yaml \
                --num_processes $(GPUS) $(ACCELERATE_ARGS) -m vizer,$(PY) -m vizer)

.PHONY: help venv lint test test-all train mapper eval caption check merge push bench demo clean

help:
	@echo "make test                              lint, then the offline test suite (CPU)"
	@echo "make lint                              ruff check + ruff format --check"
	@echo "make train RECIPE=<name> [OUT=dir] [ARGS='key.sub=value ...'] [GPUS=N] [ACCELERATE=<profile>]"
	@echo "                                       GPUS>1 launches with accelerate (profiles: recipes/accelerate/)"
	@echo "make mapper RECIPE=<name> [OUT=dir]    ViZer stage A: OUT/mapper (make train runs it first when needed)"
	@echo "make eval RUN=<dir> [ARGS=...]          base vs tuned captions: RUN/eval/results.{json,md}, gallery.html"
	@echo "make caption ADAPTER=<dir> IMAGES=<folder>   captions.jsonl for a folder of images"
	@echo "make check RECIPE=<name> [ARGS=...]    validate a recipe without loading models"
	@echo "make merge RUN=<dir>                   RUN/merged: the adapter merged into the full-precision base"
	@echo "make push RUN=<dir> REPO=<id> [ARGS=--merged]  upload the adapter (or merged model) with a model card"
	@echo "make bench [ARGS=--quick]              benchmarks, one 'name: value' line each (--quick: rewards only)"
	@echo "make demo [ARGS='--seeds 0 1 2 --ablation']   ShapesCap: zero-label GRPO end to end, offline on CPU"

venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements.txt
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON_SYS) -c "import torch" 2>/dev/null; then \
	    echo "reusing the system torch"; $(PYTHON_SYS) -m venv --system-site-packages $(VENV); \
	  else $(PYTHON_SYS) -m venv $(VENV); fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -r requirements.txt
	@touch $@

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint
	$(OFFLINE) $(PY) -m pytest -q -m "not slow"

test-all: venv
	$(OFFLINE) $(PY) -m pytest -q

train: venv
	@$(if $(ACCELERATE),$(PY) -m vizer gpus --processes $(GPUS))
	$(LAUNCH) train $(RECIPE) --out $(OUT) $(ARGS)

eval: venv
	$(PY) -m vizer eval $(RUN) $(ARGS)

caption: venv
	$(PY) -m vizer caption --adapter $(ADAPTER) --images $(IMAGES) $(ARGS)

mapper: venv
	$(PY) -m vizer mapper $(RECIPE) --out $(OUT) $(ARGS)

check: venv
	$(PY) -m vizer check $(RECIPE) $(ARGS)

merge: venv
	$(PY) -m vizer merge $(RUN) $(ARGS)

push: venv
	@test -n "$(REPO)" || { echo "make push: set REPO=<user>/<name> (the Hugging Face Hub repository)" >&2; exit 2; }
	$(PY) -m vizer push $(RUN) --repo $(REPO) $(ARGS)

bench: venv
	$(OFFLINE) $(PY) -m benchmarks $(ARGS)

demo: venv
	$(OFFLINE) $(PY) -m shapescap.demo $(ARGS)

clean:
	rm -rf outputs .pytest_cache
