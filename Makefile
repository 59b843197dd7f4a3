# Two commands do all the set-up on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch first or together with the rest, pinned, so pip never swaps in a build you did not ask for;
# on a CUDA machine set TORCH to the build you want, e.g. make demo TORCH="torch==2.13.0"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup demo test lint clean

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
