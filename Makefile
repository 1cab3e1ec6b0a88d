# dlg-course: `make book` builds the executed book, `make test` runs everything CI checks.
# Both create the virtual environment (.venv) on first use.

SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.dlgkit-installed
BOOK_FLAGS := -W -n --keep-going
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=1800 -p no:randomly

.PHONY: all install js book book-student test test-notebooks test-gpu test-device exercises benchmark benchmark-text benchmark-defences clean

all: book

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	# course: every chapter's and exercise's packages plus JupyterLab (as environment.yml); test: CI's tools
	$(BIN)/python -m pip install -e ".[course,test]"
	# ipywidgets 7 (as on Colab) beside the venv, for the test of the scrubber's fallback path
	$(BIN)/python -m pip install --no-deps --target $(VENV)/ipywidgets7 "ipywidgets==7.7.5" "ipython_genutils==0.2.0"
	touch $(STAMP)

install: $(STAMP)

# The JavaScript the book's pages load (ipywidgets' HTML manager for the scrubbers, require.js,
# MathJax) is served from the book's own _static, never from a CDN: exact npm versions, checked
# against the SHA-512 of their registry tarballs, unpacked into $(STATIC)/npm
# (html_static_path in _config.yml; the pages load _static/npm/...). html-manager 1.0.x is
# the embedder of ipywidgets 8 (its bundle carries @jupyter-widgets/base, controls and output).
STATIC := _build/static
JS_STAMP := $(STATIC)/.installed
NPM_PACKAGES := @jupyter-widgets/html-manager@1.0.15 requirejs@2.3.8 mathjax@3.2.2
define NPM_SHA512
e6d841215eb298d8263d5387bf3c7e806cbc6522a649ace1b46c38fdce312435734611bd3d3790b118c5dc5513a29bc58bffd200178dcf5ca9e3b6c2ac9dc240  jupyter-widgets-html-manager-1.0.15.tgz
eff71348b39d6243413497033167fe96e16f32b8959bb798c69e017050ac017d30178db557271ee525cfd7b73e25de68b5728635e848a27165c905d2a302fa33  requirejs-2.3.8.tgz
06df9249553c7811b6ef30a155ec0e89c62ced7b1db78d2a9b8f94a47c97ee4d3f3bd36588f73ec7bee4d7f144b0fb2328f64626fb5164cd6f3be81e5b43a11b  mathjax-3.2.2.tgz
endef
export NPM_SHA512

$(JS_STAMP): Makefile
	@command -v npm >/dev/null || { echo "make: npm is needed to fetch the book's JavaScript (Debian: apt-get install npm)" >&2; exit 1; }
	rm -rf $(STATIC) _build/npm-download && mkdir -p _build/npm-download $(STATIC)/npm/html-manager $(STATIC)/npm/requirejs $(STATIC)/npm/mathjax
	cd _build/npm-download && npm pack --silent $(NPM_PACKAGES) >/dev/null && echo "$$NPM_SHA512" | sha512sum --quiet --strict -c -
	tar -xzf _build/npm-download/jupyter-widgets-html-manager-*.tgz -C $(STATIC)/npm/html-manager --strip-components=2 package/dist
	rm $(STATIC)/npm/html-manager/{embed.js,embed.js.map,libembed-amd.js}
	tar -xzf _build/npm-download/requirejs-*.tgz -C $(STATIC)/npm/requirejs --strip-components=1 package/require.js
	tar -xzf _build/npm-download/mathjax-*.tgz -C $(STATIC)/npm/mathjax --strip-components=1 package/LICENSE
	tar -xzf _build/npm-download/mathjax-*.tgz -C $(STATIC)/npm/mathjax --strip-components=2 package/es5/tex-mml-chtml.js package/es5/input package/es5/output package/es5/ui package/es5/a11y package/es5/sre
	rm -rf _build/npm-download
	touch $@

## js: fetch the book's JavaScript (pinned npm packages) into _build/static/npm
js: $(JS_STAMP)

## book: execute every chapter (full budget) and write the HTML to _build/html; the time of
## each notebook and of the whole build land in _build/book-timings.txt
book: $(STAMP) $(JS_STAMP)
	set -o pipefail; start=$$(date +%s); \
	DLGKIT_PROGRESS=0 $(BIN)/jupyter-book build . $(BOOK_FLAGS) 2>&1 | tee _build/book.log; \
	{ grep -o '[^ /]*/[^ /]*\.ipynb: Executed notebook in [0-9.]* seconds' _build/book.log; \
	  echo "whole build: $$(( $$(date +%s) - start )) s"; } | tee _build/book-timings.txt

## book-student: the book without the solutions pages, for teachers who hand out the exercises
## (same chapters, executed as in `make book`); HTML in _build/student/_build/html
book-student: $(STAMP) $(JS_STAMP)
	DLGKIT_PROGRESS=0 $(BIN)/python scripts/student_book.py --out _build/student

## test: everything CI checks, with the quick budget
test: export DLGKIT_QUICK = 1
test: export DLGKIT_PROGRESS = 0
test: $(STAMP) $(JS_STAMP)
	$(BIN)/python scripts/make_exercises.py --check
	# the unit tests on every core, one torch thread per worker (budget.threads_for: two processes
	# with 2 threads each on 2 cores run 5-6x slower); the Flower tests (Ray, a deployment engine on
	# localhost) share one worker (xdist_group "flower")
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest tests --ignore=tests/built_book --durations=20 -n auto --dist loadgroup
	# the book build executes every chapter and solution notebook (allow_errors: false, so a
	# failing cell or assert fails the build): a separate nbval pass would run them all twice
	rm -rf _build/html
	$(BIN)/jupyter-book build . $(BOOK_FLAGS)
	$(BIN)/python -m pytest tests/built_book

## test-notebooks: every chapter and solution notebook under nbval (quick budget), without the
## book build: the quicker check while editing a notebook
test-notebooks: export DLGKIT_QUICK = 1
test-notebooks: export DLGKIT_PROGRESS = 0
test-notebooks: $(STAMP)
	$(BIN)/python -m pytest $(NBVAL) book solutions

## test-gpu: every notebook under nbval at the full budget (on CUDA when present): a cell that
## raises or an assert that fails fails the run; scripts/nbval_keep.py keeps the executed copies
## and a per-notebook timing table (_build/executed/timings.md)
test-gpu: export DLGKIT_QUICK = 0
test-gpu: export DLGKIT_PROGRESS = 0
test-gpu: $(STAMP)
	mkdir -p _build
	PYTHONPATH=scripts $(BIN)/python -m pytest $(NBVAL) -p nbval_keep --keep-executed _build/executed book solutions

## test-device: every notebook (quick budget) on the simulated GPU of tests/support/simulated_cuda.py,
## which fails wherever a chapter would mix CPU and CUDA tensors; for machines without a GPU.
## A chapter also fails if less than 80% of its tensor operations ran on the GPU. The exercise
## checks build their own small models on the CPU, so the solutions are only checked for mix-ups.
test-device: export DLGKIT_QUICK = 1
test-device: export DLGKIT_PROGRESS = 0
test-device: export DLGKIT_DEVICE = cuda
test-device: $(STAMP)
	mkdir -p _build
	set -o pipefail; $(BIN)/python scripts/run_notebooks.py --simulate-cuda --min-cuda-share 0.8 --out _build/simulated-cuda book | tee _build/simulated-cuda-timings.txt
	set -o pipefail; $(BIN)/python scripts/run_notebooks.py --simulate-cuda --out _build/simulated-cuda solutions | tee -a _build/simulated-cuda-timings.txt

## exercises: regenerate exercises/ from solutions/
exercises: $(STAMP)
	$(BIN)/python scripts/make_exercises.py

## benchmark: print the image attack tables (single images, batches)
benchmark: $(STAMP)
	$(BIN)/python benchmarks/image_attacks.py

## benchmark-text: the three text leaks on every sample sentence
benchmark-text: $(STAMP)
	$(BIN)/python benchmarks/text_attacks.py

## benchmark-defences: the defence sweep, as CSV and Markdown in _build/benchmarks
benchmark-defences: $(STAMP)
	$(BIN)/python benchmarks/defences.py

clean:
	rm -rf _build .pytest_cache
