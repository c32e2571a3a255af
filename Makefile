# `make demo` runs the main job (VAE vs mixture on Fashion-MNIST); `make test` runs lint and the test suite. Both create .venv first.
PY ?= python3
# one venv per Python, e.g. make test PY=python3.13 VENV=.venv-3.13
VENV ?= .venv
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
	$(BIN)/pyrovae compare --dataset fashion-mnist --download --representation binary --epochs 10 \
		--gmm-k 10 --k 1000 --n 2000 --out runs/demo --overwrite

test: venv
	$(BIN)/ruff check pyrovae tests bench examples
	$(BIN)/python -c 'import platform, arviz, pyro, torch; print(f"Python {platform.python_version()}, ArviZ {arviz.__version__}, Pyro {pyro.__version__}, torch {torch.__version__}")' 2>/dev/null
	$(BIN)/python -m pytest -q
