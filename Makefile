# The README's two commands. Both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup fmnist test demo bench notebooks gpu-prep gpu-check clean

$(BIN)/advgkl: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

setup: $(BIN)/advgkl

# Real Fashion-MNIST from Debian's dataset-fashion-mnist package, when apt is available.
fmnist:
	@if [ ! -f $(FMNIST) ] && command -v apt-get >/dev/null; then \
	  $(SUDO) apt-get install -y -q dataset-fashion-mnist || \
	  ($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q dataset-fashion-mnist); fi

# Ends with the line coverage of advgkl/ (all processes the tests start, combined).
test: setup fmnist
	$(BIN)/python -m pytest -q --cov=advgkl --cov-report=term --cov-fail-under=95

# --resume: a second `make demo` continues (or re-reports) the same run instead of refusing the folder.
demo: setup fmnist
	$(BIN)/advgkl train experiments/recipes/fmnist_gkl_demo.yaml --out runs/fmnist_gkl_demo --resume

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --smoke || exit 1; done

# The notebooks' only source is notebooks/NN_*.py (jupytext percent format). This builds notebooks/NN_*.ipynb
# (git ignores them) and executes them in place, outputs included, to read in Jupyter;
# `ADVGKL_WRITE_FIGURES=1 make notebooks` also rewrites the study's summary.md and summary.png.
NOTEBOOK_SRC = $(wildcard notebooks/[0-9][0-9]_*.py)

notebooks: setup fmnist
	$(BIN)/jupytext --to ipynb --set-kernel python3 $(NOTEBOOK_SRC)
	$(BIN)/jupyter execute --inplace $(NOTEBOOK_SRC:.py=.ipynb)

# The GPU check (docs/gpu.md). gpu-prep, on a machine with network: the wheels and data the GPU machine
# lacks, into .gpu/; it prints the size that must travel. gpu-check: on the GPU machine (plain python3
# there; the venv here), results into GPU_OUT; SMOKE=1 runs the same script at toy sizes on the CPU.
GPU_OUT ?= benchmarks/results/gpu_check
GPU_PY = $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)

gpu-prep: setup fmnist
	$(BIN)/python benchmarks/gpu_prep.py --dir .gpu

gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py --prep .gpu --out $(GPU_OUT) $(if $(SMOKE),--smoke)

clean:
	rm -rf $(VENV) *.egg-info
