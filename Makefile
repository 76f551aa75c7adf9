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
	$(BIN)/flagsim pipeline --config $(CONFIG) --run $(RUN_DIR)

embed: $(STAMP)
	$(BIN)/flagsim embed --config $(CONFIG) --run $(RUN_DIR)

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

bench: $(STAMP)
	$(BIN)/python -m bench.run

# Runs on a bare GPU machine too (no venv needed): python3 scripts/gpu_check.py --out DIR
gpu-check:
	$(if $(wildcard $(BIN)/python),$(BIN)/python,$(PYTHON)) scripts/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf runs .pytest_cache

# --- Ray cluster jobs (docs/cluster.md): `ray job submit` to RAY_ADDRESS, e.g.
#     make submit-all RAY_ADDRESS=http://head:8265 CLUSTER_RUN_DIR=s3://bucket/runs/flags
# With token authentication also export RAY_AUTH_MODE=token (the token: ~/.ray/auth_token).
CLUSTER_CONFIG ?= configs/cluster-gpu.yaml
RUNTIME_ENV ?= configs/runtime_env.yaml
CLUSTER_RUN_DIR ?=
SUBMIT_ARGS ?=
JOB_ARGS = --config $(CLUSTER_CONFIG) $(if $(CLUSTER_RUN_DIR),--run $(CLUSTER_RUN_DIR))
RAY_WAIT_TIMEOUT ?= 120
# first wait (up to RAY_WAIT_TIMEOUT s) until the head's job agent can take the job
SUBMIT = $(if $(RAY_ADDRESS),,$(error set RAY_ADDRESS to the cluster's job API, e.g. http://head:8265)) \
	$(BIN)/python scripts/wait_for_ray_jobs.py $(RAY_ADDRESS) --timeout $(RAY_WAIT_TIMEOUT) && \
	RAY_ADDRESS=$(RAY_ADDRESS) $(BIN)/ray job submit --working-dir . --runtime-env $(RUNTIME_ENV) $(SUBMIT_ARGS) --

.PHONY: submit-embed submit-index submit-neighbours submit-all

submit-embed: $(STAMP)
	$(SUBMIT) python jobs/embed.py $(JOB_ARGS)

submit-index: $(STAMP)
	$(SUBMIT) python jobs/build_index.py $(JOB_ARGS)

submit-neighbours: $(STAMP)
	$(SUBMIT) python jobs/neighbours.py $(JOB_ARGS)

submit-all: $(STAMP)
	$(SUBMIT) python jobs/pipeline.py $(JOB_ARGS)
