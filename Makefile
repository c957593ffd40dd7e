# Everything runs from the project's own virtualenv, created on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install run test test-reliability lint fmt proto proto-check bench bench-quick clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python scripts/dev.py

# The fast suite (about four minutes on 2 cores); the slow fault and load tests are test-reliability's.
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# Crash loop, blackhole, SIGTERM under load, a cluster failover, the front door under attack, a 2-minute soak (about 7 minutes).
test-reliability: $(STAMP)
	$(BIN)/python -m pytest -m slow

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	BUF=$(BIN)/buf scripts/proto_compat.sh

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Maps proto/ into the package path so the stubs import as events_server.pb.*.
proto: $(STAMP)
	cd src && ../$(BIN)/python -m grpc_tools.protoc -Ievents_server/pb=../proto \
		--python_out=. --grpc_python_out=. \
		--plugin=protoc-gen-mypy=../$(BIN)/protoc-gen-mypy --mypy_out=. \
		--plugin=protoc-gen-mypy_grpc=../$(BIN)/protoc-gen-mypy_grpc --mypy_grpc_out=. \
		events_server/pb/events.proto

# Fails when the committed stubs differ from what `make proto` generates.
proto-check: proto
	git diff --exit-code -- src/events_server/pb
	test -z "$$(git status --porcelain -- src/events_server/pb)"

# Throughput and latency against our own ceiling and a naive peer (~3 min; bench-quick < 60 s).
# The HTTP phases need wrk (apt-get install wrk); without it they fall back to a Python
# generator, with a warning.
bench: $(STAMP)
	$(BIN)/python -m bench.run

bench-quick: $(STAMP)
	$(BIN)/python -m bench.run --quick

clean:
	rm -rf $(VENV) .run .mypy_cache .ruff_cache .pytest_cache
