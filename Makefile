# mlwb: the two quick-start commands are `make run` and `make test`; both set up the environment first.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.mlwb-installed
PROJECT ?= fraud-detection

.PHONY: setup services run test test-notebooks test-pytest export clean-notebooks lock ui

# Create the virtual environment and install mlwb with the exact versions of constraints.txt.
# pip compiles every package's bytecode at install (a minute of CPU), and that is needed: where
# PYTHONDONTWRITEBYTECODE is set, as on these machines, Python never writes the bytecode it compiles,
# so without it every process -- each `mlwb` command, kernel and server a test starts -- compiles
# mlflow, scikit-learn and pandas again (measured: 8.3 s of CPU to import them, 3.2 s with bytecode).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt -e ".[dev,datasets]"
	$(BIN)/python -m compileall -q mlwb
	touch $(STAMP)

setup: $(STAMP)

# The main job: the fraud-detection project's pipeline end to end, on the embedded MLflow store.
run: setup
	$(BIN)/mlwb run $(PROJECT)

# Every test: the notebooks' own asserts (slow cells included) and pytest, side by side, so that each
# keeps the cores busy while the other is collecting, or finishing its last notebook or test module.
# Their output interleaves live: nbdev-test prints a line per failing notebook and one at the end.
test: setup
	$(MAKE) --no-print-directory -j2 test-notebooks test-pytest

test-notebooks: setup
	$(BIN)/nbdev-test --flags slow

# What the tests need beyond Python: Debian's PostgreSQL (team tracking server) and Chromium (browser tests).
services:
	.ci/postgres install
	.ci/chromium

# One pytest process per CPU (pytest-xdist); tests/conftest.py keeps each module, and each guided project's
# runs, in one process.
test-pytest: setup services
	$(BIN)/pytest -n logical --dist loadscope --no-loadscope-reorder

# After editing a notebook in nbs/: regenerate mlwb/ and strip outputs and metadata.
export: setup
	$(BIN)/nbdev-export
	$(BIN)/nbdev-clean
	$(BIN)/nbdev-clean --fname projects

# Serve the MLflow UI on the embedded store.
ui: setup
	$(BIN)/mlwb ui

# Rewrite constraints.txt from the environment (after changing dependencies); update environment.yml to match.
lock: setup
	{ sed -n '1,3p' constraints.txt; $(BIN)/python -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
