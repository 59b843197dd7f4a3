# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch first or together with the rest, pinned, so pip never swaps in a build you did not ask for;
# on a CUDA machine set TORCH to the build you want, e.g. make demo TORCH="torch==2.13.0"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean tf4

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check "$(TORCH)" -e ".[dev]"
	touch $@

demo: setup
	$(BIN)/sdswarm mother configs/tiny.yaml

test: setup lint
	$(BIN)/pytest

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf output .pytest_cache .ruff_cache

# A second virtualenv with transformers 4 (what most users' inference tools run): tests/train/test_checkpoint.py
# loads our checkpoints there. Optional: the test is skipped, saying so, without it.
TF4_VENV ?= .venv-tf4
tf4: $(TF4_VENV)/.installed

$(TF4_VENV)/.installed:
	$(PYTHON) -m venv $(TF4_VENV)
	$(TF4_VENV)/bin/pip install --quiet --disable-pip-version-check "$(TORCH)" transformers==4.57.6 \
		diffusers==0.35.2 safetensors==0.8.0 huggingface_hub==0.36.2 "numpy<2.4"
	touch $@
