# `make demo` and `make test` each set everything up (a .venv here) and run.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/engine demo --workdir demo-run

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_knn.py
	$(BIN)/python benchmarks/bench_train.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache
