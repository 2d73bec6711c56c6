# fedpref: `make demo` runs the main simulation, `make test` runs the test suite,
# `make test-fast` all but the slow end-to-end tests (pytest -m "not slow").
# Each creates .venv by itself (torch pinned to the 2.13.0 CPU wheel).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fedpref-installed

.PHONY: install demo test test-fast bench bench-scale proto clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test,dev]'
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpref-sim run --out results/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)   # minus the end-to-end runs marked slow (Ray, deployment, restart, SecAgg+)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	$(BIN)/fedpref-sim bench

bench-scale: $(STAMP)   # 1,000 federated users + 250 new (issue 11): wall time, peak RSS, phase split
	$(BIN)/fedpref-sim run --config simulations/configs/scale-1000.toml --out results/scale-1000

proto: $(STAMP)   # regenerate protocol/agent_pb2*.py from protocol/agent.proto
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	PYTHON=$(BIN)/python scripts/gen_proto.sh

clean:
	rm -rf results build *.egg-info .pytest_cache
