# The README's two commands. Both set up everything they need on a fresh machine.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: setup fmnist test demo bench clean

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

test: setup fmnist
	$(BIN)/python -m pytest -q

# --resume: a second `make demo` continues (or re-reports) the same run instead of refusing the folder.
demo: setup fmnist
	$(BIN)/advgkl train experiments/recipes/fmnist_gkl_demo.yaml --out runs/fmnist_gkl_demo --resume

bench: setup
	for b in benchmarks/bench_*.py; do $(BIN)/python $$b --smoke || exit 1; done

clean:
	rm -rf $(VENV) *.egg-info
