# `make demo` trains the main job; `make test` runs lint and the test suite. Both create .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The shared Fashion-MNIST beside a checkout is used when present (else the demo downloads it).
SHARED := $(wildcard ../shared/data)
export PYROVAE_DATA ?= $(if $(SHARED),$(abspath $(SHARED)),)

.PHONY: demo test venv
venv: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

demo: venv
	$(BIN)/pyrovae train --dataset fashion-mnist --download --likelihood bernoulli --binarize dynamic \
		--elbo meanfield --arch iwae --epochs 10 --batch-size 100 --lr 1e-3 --out runs/demo --overwrite

test: venv
	$(BIN)/ruff check pyrovae tests bench examples
	$(BIN)/python -m pytest -q
