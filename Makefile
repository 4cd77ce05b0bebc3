# xlpeft developer entry points. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# CPU wheel by default; on a GPU machine use e.g. `make TORCH_SPEC=torch install`.
TORCH_SPEC ?= torch==2.13.0
STAMP  := $(VENV)/.xlpeft-installed
# pytest-xdist workers: one per core, at most 4 (`make test WORKERS=0` runs in one process, e.g. to debug)
WORKERS ?= auto
XDIST  := -n $(WORKERS) --maxprocesses 4

.PHONY: install demo test test-all test-fast lint clean ui ui-check

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev,demo]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/xlpeft run pipelines/demo.yaml

test: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not exhaustive"

# everything, also the CLI-level resume/DDP checks for every method (tests/tiers.py): ~10 more minutes
test-all: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q $(XDIST) -m "not slow and not exhaustive"

lint: $(STAMP)
	$(BIN)/ruff check xlpeft tests

ui: $(STAMP)
	@MLFLOW_TRACKING_URI=sqlite:///mlflow.db $(BIN)/python -m xlpeft.tracking ui-url
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

# the MLflow UI on a copy of the demo store (`make demo` first) in headless Chromium: PASS/FAIL per page, screenshots
# under $XLPEFT_CACHE/ui-check/ (tools/ui_check.py)
ui-check: $(STAMP)
	$(BIN)/python tools/ui_check.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
