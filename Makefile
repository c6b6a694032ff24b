# make demo: build the environment and run the main job. make test: the same, then the tests.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench bench-quick bench-scale bench-budget clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first and pinned: an unpinned resolve would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[all,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	bash scripts/demo.sh

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python -m bench

bench-quick: install
	$(BIN)/python -m bench --quick

# FLUX.1-dev's shape under 16 GB and 8 GB (BENCH_BUDGET_ARGS="--scale reduced --budgets 2.5GB 1.6GB"
# for the reduced one); the pipeline is written once into $(DIFFQUANT_BENCH_CACHE) (default bench/.cache)
bench-budget: install
	$(BIN)/python -m bench.budget $(BENCH_BUDGET_ARGS)

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info

# FLUX.1-dev-shaped checkpoint (23.8 GB, written once; DIFFQUANT_BENCH_CACHE moves it), every
# backend loaded in its own process: see bench/scale.py
bench-scale: install
	$(BIN)/python -m bench.scale
