# flagsim: `make embed-all` runs the whole job on the bundled flags; `make test` runs the tests.
# Both create .venv and install the project when it is missing or pyproject.toml changed.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= configs/default.yaml
RUN_DIR ?= runs/default
STAMP := $(VENV)/.installed

.PHONY: install test test-slow lint embed-all embed index neighbours report reference bench gpu-check clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP)
	$(BIN)/ruff check flagsim jobs tests bench scripts

embed-all: $(STAMP)
	$(BIN)/flagsim pipeline --config $(CONFIG) --out $(RUN_DIR)

embed: $(STAMP)
	$(BIN)/flagsim embed --config $(CONFIG) --out $(RUN_DIR)

index: $(STAMP)
	$(BIN)/flagsim index --config $(CONFIG) --run $(RUN_DIR)

neighbours: $(STAMP)
	$(BIN)/flagsim neighbours --config $(CONFIG) --run $(RUN_DIR)

report: $(STAMP)
	$(BIN)/flagsim report --config $(CONFIG) --run $(RUN_DIR)

# The original experiment's six pretrained-model embeddings: import, neighbours, comparison.
reference: $(STAMP)
	$(BIN)/flagsim import-csv tests/data/reference/national_flag_embeddings_*.csv.gz --run runs/original
	$(BIN)/flagsim neighbours --run runs/original -k 5
	$(BIN)/flagsim compare --run runs/original
	$(BIN)/flagsim report --run runs/original

clean:
	rm -rf runs .pytest_cache
