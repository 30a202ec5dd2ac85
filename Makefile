# The README's two commands are `make run` and `make test`; both build or
# refresh the virtual environment first, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv run test lint fmt typecheck protos protos-check bench bench-e2e bench-service reliability rules-check image check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

## Run the whole service on the embedded broker with demo traffic.
run: $(STAMP)
	$(BIN)/pool-server --embedded --demo $(ARGS)

## Install what is needed (venv, Debian's prometheus for the deploy tests) and run the tests.
test: $(STAMP)
	bash scripts/ensure_system_deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy pool server clients

## Regenerate the committed protobuf / gRPC code (and typed stubs).
protos: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

## Fail if the committed generated code differs from a fresh generation.
protos-check: $(STAMP)
	$(BIN)/python scripts/gen_protos.py --check

bench: $(STAMP)
	$(BIN)/python bench/pool_bench.py

## End to end through the embedded broker: plain loop, per-partition wait, keyed, actor.
bench-e2e: $(STAMP)
	$(BIN)/python bench/e2e_bench.py

## The shipped pool-server process beside the plain aiokafka loop; bench/results/service_bench.json.
bench-service: $(STAMP)
	$(BIN)/python bench/service_bench.py $(ARGS)

## Fault, load and bad-input campaigns against the real service; writes docs/reliability.md.
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py $(ARGS)

## promtool checks and unit tests of the alert and recording rules.
rules-check: $(STAMP)
	bash scripts/ensure_system_deps.sh
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml

image:
	docker build -t pool-server .

check: lint typecheck protos-check test

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
