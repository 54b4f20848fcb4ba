# cmm-book: one entry point. `make book` (main job) and `make test` work on a fresh machine:
# they create .venv, install the pinned packages and vendor MathJax for the offline book.
PROFILE ?= cpu
# A relative data/cache/results root is meant from here, not from notebooks/ where kernels (and `make lab`) start.
$(foreach v,CMM_DATA CMM_CACHE CMM_RESULTS,$(if $(strip $($(v))),$(eval export $(v) := $(abspath $($(v))))))
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
MATHJAX := book/_vendor/mathjax/tex-chtml.js
MATHJAX_VERSION := 3.2.2

.PHONY: book notebooks html test unit data lab browser browse clean clean-cache help grid slurm gpu-check

help:
	@echo "make book [PROFILE=smoke|cpu|paper]  execute every notebook with papermill, build _build/html"
	@echo "make test                            unit tests, smoke notebooks under nbval, book + browser test"
	@echo "make grid [PROFILE=..] [EXECUTOR=local|slurm|debug] [GRID_ARGS=..]  every chapter's runs, in parallel (book/cluster.md)"
	@echo "make gpu-check [GPU_CHECK_ARGS=..]    each chapter's paper networks trained, merged, evaluated on CUDA (<= 8 min)"
	@echo "make data                            check (and download where allowed) every dataset under CMM_DATA"
	@echo "make lab                             JupyterLab on notebooks/"
	@echo "make browse                          open every page of the last built book in headless Chromium"
	@echo "make clean-cache                     delete backbones, checkpoints and cached runs (after a code change)"

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-cache-dir --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir -e ".[dev,paper]"
	touch $@

$(MATHJAX):
	@mkdir -p book/_vendor
	tmp=$$(mktemp -d) && (cd $$tmp && npm pack mathjax@$(MATHJAX_VERSION) --silent >/dev/null \
	  && tar -xzf mathjax-$(MATHJAX_VERSION).tgz package/es5) \
	  && mkdir -p $$tmp/mj/output && cd $$tmp/package/es5 \
	  && cp -r tex-chtml.js a11y input ui adaptors $$tmp/mj/ && cp -r output/chtml output/chtml.js $$tmp/mj/output/ \
	  && cd - >/dev/null && rm -rf book/_vendor/mathjax && mv $$tmp/mj book/_vendor/mathjax && rm -rf $$tmp

book: $(VENV)/.installed $(MATHJAX)
	$(PY) -m cmm_utils.runner build --profile $(PROFILE)

notebooks: $(VENV)/.installed
	$(PY) -m cmm_utils.runner execute --profile $(PROFILE)

html: $(VENV)/.installed $(MATHJAX)
	$(PY) -c "from cmm_utils.runner import build_book; build_book('$(PROFILE)')"

browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	  echo "chromium/chromedriver not installed: the browser test will be skipped (outside CI)"

# Debian's single-node SLURM for the grid's tests (tests/slurm_cluster.py starts it under a temp dir);
# without root or Debian the SLURM tests are skipped and the local-executor tests still run.
slurm:
	@PATH="$$PATH:/usr/sbin:/sbin"; command -v slurmctld >/dev/null && command -v slurmd >/dev/null && \
	  command -v sbatch >/dev/null && command -v munged >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	    apt-get install -y -qq slurmctld slurmd slurm-client munge >/dev/null; } || \
	  echo "slurm/munge not installed: the grid's SLURM tests will be skipped (outside CI)"

# Every chapter's runs of a profile as independent jobs (submitit): cached units are skipped, the
# rest run as a SLURM job array or as local processes; the notebooks then read the cached runs.
# e.g. make grid PROFILE=paper EXECUTOR=slurm GRID_ARGS="--partition gpu --gpus-per-job 1"
EXECUTOR ?= local
PARALLEL ?= 2
grid: $(VENV)/.installed
	$(PY) -m cmm_utils.grid --profile $(PROFILE) --executor $(EXECUTOR) --parallel $(PARALLEL) $(GRID_ARGS)

# The smoke notebooks are executed by papermill (they become the book's chapters for the book
# test), then pytest runs the unit tests, re-executes them under nbval and tests the built book.
test: $(VENV)/.installed $(MATHJAX) browser slurm
	$(PY) -m cmm_utils.runner execute --profile smoke
	$(PY) -m pytest tests runs/smoke/notebooks --nbval-lax

# Each chapter's paper-profile networks (random weights, the 224 px HAM10000 JPEGs under CMM_DATA) for a
# few steps, a merge and an evaluation on one GPU: device placement, images/s, peak memory; no network.
# Not part of `make test` (its `--device cpu --tiny` dry run is: tests/test_gpu_check.py).
# e.g. make gpu-check GPU_CHECK_ARGS="--device cuda:1 --precision amp-bf16"
GPU_CHECK_ARGS ?=
gpu-check: $(VENV)/.installed
	$(PY) -m cmm_utils.gpu_check --device cuda $(GPU_CHECK_ARGS)

# the headless-browser check of the last built book, whatever its profile (make book PROFILE=cpu && make browse)
browse: $(VENV)/.installed browser
	$(PY) -m tests.browser _build/html

unit: $(VENV)/.installed
	$(PY) -m pytest tests -m "not book"

data: $(VENV)/.installed
	$(PY) -m cmm_utils.runner data --download

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab notebooks/

clean:
	rm -rf _build runs book/chapters book/run_log.md

# Caches are keyed by configuration, not by code: after pulling a change to how something is
# trained or evaluated, recompute everything (pretrained backbones, checkpoints, cached runs).
clean-cache: clean
	rm -rf $(or $(CMM_CACHE),.cache) $(or $(CMM_RESULTS),results)
