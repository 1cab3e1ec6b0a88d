# dlg-course: `make book` builds the executed book, `make test` runs everything CI checks.
# Both create the virtual environment (.venv) on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlgkit-installed
BOOK_FLAGS := -W -n --keep-going
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 -p no:randomly

.PHONY: all install book book-quick test test-unit test-notebooks test-exercises test-html test-gpu exercises benchmark clean

all: book

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e ".[test]"
	# ipywidgets 7 (as on Colab) beside the venv, for the test of the scrubber's fallback path
	$(BIN)/python -m pip install --no-deps --target $(VENV)/ipywidgets7 "ipywidgets==7.7.5" "ipython_genutils==0.2.0"
	touch $(STAMP)

install: $(STAMP)

## book: execute every chapter (full budget) and write the HTML to _build/html
book: $(STAMP)
	DLGKIT_PROGRESS=0 $(BIN)/jupyter-book build . $(BOOK_FLAGS)

## test: everything CI checks, with the quick budget
test: export DLGKIT_QUICK = 1
test: export DLGKIT_PROGRESS = 0
test: $(STAMP)
	$(BIN)/python scripts/make_exercises.py --check
	$(BIN)/python -m pytest tests --ignore=tests/built_book
	$(BIN)/python -m pytest $(NBVAL) book solutions
	rm -rf _build/html
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)
	$(BIN)/python -m pytest tests/built_book

## test-gpu: execute every notebook at the full budget (on CUDA when present); executed
## copies and a per-notebook timing table land in _build/executed
test-gpu: export DLGKIT_QUICK = 0
test-gpu: export DLGKIT_PROGRESS = 0
test-gpu: $(STAMP)
	mkdir -p _build
	set -o pipefail; $(BIN)/python scripts/run_notebooks.py --out _build/executed book solutions | tee _build/gpu-timings.txt

## exercises: regenerate exercises/ from solutions/
exercises: $(STAMP)
	$(BIN)/python scripts/make_exercises.py

## benchmark: print the attack benchmark table
benchmark: $(STAMP)
	$(BIN)/python benchmarks/image_attacks.py

clean:
	rm -rf _build .pytest_cache
