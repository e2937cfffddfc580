# The project's commands (see README.md). `make run` and `make test` do all of their own set-up and are
# idempotent: a second call reuses .venv and the data.
#
#   make run          set up, execute the notebooks in the full profile in place, export HTML, update README
#                     (reusing cached trainings and evaluations; FRESH=evaluations or FRESH=all recomputes)
#   make test         set up, then lint, then pytest
#   make test-fast    set up, then the unit tests alone (no notebook runs, nothing slow)
#   make lint         ruff check and ruff format --check
#   make quick        every notebook in the quick profile into runs/quick/ (committed files untouched)
#   make html         export the executed notebooks to Assignment01_PartN_output.html
#   make student      after editing student.json: the notebooks' Student Information blocks, Part 1 re-executed
#   make submission   <student id>_assignment01_solution.zip once all agrees with student.json (EXAMPLE=1: example)
#   make readme       refresh the results table in README.md from results/*.json (tools/render_readme.py)

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

# The Python that creates .venv: PYTHON_BOOT if given, else the first of python3.11, python3.12, python3.13
# that runs here (a pyenv shim of a version that is not selected does not). The project supports 3.11-3.13.
SUPPORTED_PYTHONS := python3.11 python3.12 python3.13
PYTHON_BOOT ?= $(firstword $(foreach p,$(SUPPORTED_PYTHONS),$(shell $(p) -c 'print("$(p)")' 2>/dev/null)))
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.requirements-installed
NOTEBOOKS := $(foreach n,1 2 3,Assignment01_Part$(n)_solution.ipynb)
SUBMISSION_DIR ?= .
# pytest-xdist workers of `make test` (one per core of the 2-core machine)
TEST_WORKERS ?= 2

.PHONY: help venv data fashion-mnist animals run test test-fast lint quick html student submission readme

help:
	@grep '^#   make ' Makefile | cut -c2-

# --- set-up -------------------------------------------------------------------------------------

venv: $(STAMP)

# Reinstalls only when a requirements file is newer than the stamp.
$(STAMP): requirements.txt requirements-dev.txt
	@if [ ! -x $(PY) ]; then \
	    [ -n "$(PYTHON_BOOT)" ] || { echo "none of $(SUPPORTED_PYTHONS) found: install one (e.g. apt-get install python3.12 python3.12-venv) or pass PYTHON_BOOT=/path/to/python3.x" >&2; exit 1; }; \
	    command -v $(PYTHON_BOOT) >/dev/null || { echo "$(PYTHON_BOOT) not found: install Python 3.11, 3.12 or 3.13, or pass PYTHON_BOOT=/path/to/python3.x" >&2; exit 1; }; \
	    echo "Creating $(VENV) with $(PYTHON_BOOT) ($$($(PYTHON_BOOT) --version))"; \
	    $(PYTHON_BOOT) -m venv $(VENV) || { echo "could not create $(VENV): install the venv module (e.g. apt-get install $(notdir $(PYTHON_BOOT))-venv)" >&2; exit 1; }; \
	fi
	@echo "Using $(PY): $$($(PY) --version)"
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $@

data: fashion-mnist animals

fashion-mnist:
	@bash datasets/provision_fashion_mnist.sh

# Animals: datasets/Animals or $ANIMALS_DIR, holding <class>/<image>. Missing or empty is an error,
# or only a warning where ANIMALS_OPTIONAL=1 (the tests that need the images skip without them).
animals:
	@dir="$${ANIMALS_DIR:-datasets/Animals}"; \
	if [ ! -d "$$dir" ]; then problem="does not exist"; \
	elif [ -z "$$(find -L "$$dir" -mindepth 2 -type f -print -quit)" ]; then problem="is empty (no <class>/<image> files)"; \
	else echo "Animals: $$dir"; exit 0; fi; \
	msg="the Animals folder '$$dir' $$problem. Put the course's Animals images there (see datasets/README.md) or set ANIMALS_DIR to the folder that holds them."; \
	if [ "$(ANIMALS_OPTIONAL)" = 1 ]; then echo "warning: $$msg Tests that need it are skipped." >&2; \
	else echo "error: $$msg" >&2; exit 1; fi

# --- the two commands ---------------------------------------------------------------------------

# FRESH: "" reuses every cached training and evaluation, "evaluations" recomputes what is measured on the
# models, "all" retrains every model too (see README, "The experiment cache")
FRESH ?=

run: venv data
	$(PY) tools/personalise.py --blocks $(NOTEBOOKS)
	PYTHON=$(PY) FRESH=$(FRESH) bash export_html.sh --execute
	python3 tools/render_readme.py

test: ANIMALS_OPTIONAL := 1
test: venv fashion-mnist animals
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup tests

# --- the others ---------------------------------------------------------------------------------

# The markers are declared in pyproject.toml: `notebook` (executes a notebook), `slow` (long training or attacks).
test-fast: ANIMALS_OPTIONAL := 1
test-fast: venv fashion-mnist animals
	$(PY) -m pytest -q -m "not notebook and not slow" tests

lint: venv
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

quick: venv data
	@mkdir -p runs/quick
	@for nb in $(NOTEBOOKS); do \
	    if [ ! -f "$$nb" ]; then echo "skipping $$nb: not written yet"; continue; fi; \
	    $(PY) -m papermill "$$nb" "runs/quick/$$nb" -p PROFILE quick -k python3 --cwd "$(CURDIR)"; \
	done

html: venv
	PYTHON=$(PY) bash export_html.sh

# After editing student.json: its details into every notebook's Student Information block (a Markdown cell),
# and Part 1, whose Question 1.3 draws its weights from the student ID, re-executed in the full profile
# (tools/personalise.py). No training, no attack: under two minutes.
student: venv
	@$(PY) tools/personalise.py $(NOTEBOOKS)

# The zip the assignment asks for, ready to run as submitted: the three notebooks and their HTML exports
# (made afresh by export_html.sh, which refuses a broken notebook), every module they import, student.json,
# requirements.txt, results/ (figures and every cache record), every model those name, the images the
# notebooks show and a README saying how to run it. Named for student.json's ID and refused, one line per
# problem, while student.json holds the template's placeholders (unless EXAMPLE=1), a notebook's Student
# Information block differs from it, or Part 1 was computed for another ID; derived from the notebooks,
# records and results, it refuses a missing file before exporting anything, and prints the zip's size
# (tools/make_submission.py).
submission: venv
	@if [ "$(origin STUDENT_ID)" = "command line" ]; then \
	    echo "error: STUDENT_ID=$(STUDENT_ID) is not taken: the zip is named for student.json's ID; edit student.json, then run \`make student\`" >&2; exit 1; \
	fi
	@PYTHON=$(PY) $(PY) tools/make_submission.py $(if $(filter 1,$(EXAMPLE)),--example) "$(SUBMISSION_DIR)" $(NOTEBOOKS)

readme:
	python3 tools/render_readme.py
