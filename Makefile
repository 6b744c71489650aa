# `make demo` and `make test` each set everything up (a .venv here) and run.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test bench install clean browser

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# The pinned torch is a CUDA build: the environment takes about 6.5 GB. Say so up front
# instead of failing half-way through pip with ENOSPC.
NEED_KB := 7000000

$(STAMP): $(BIN)/python pyproject.toml
	@free=$$(df -Pk $(VENV) | awk 'NR==2 {print $$4}'); \
	  [ "$$free" -ge $(NEED_KB) ] || \
	  echo "make: only $$((free / 1024)) MB free where $(VENV) lives; installing needs about 7 GB" >&2
	$(BIN)/python -m pip install --quiet --no-cache-dir --upgrade pip
	$(BIN)/python -m pip install --quiet --no-cache-dir -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/engine demo --out demo-run

test: $(STAMP) browser
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest -q

# The report test renders pages in a real headless chromium; install Debian's when missing
# (needs root and apt; without them that test skips and says why).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	    { apt-get update -qq >/dev/null 2>&1; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1; } ; } || \
	  echo "make: chromium not installed (no root or apt); the report browser test will skip" >&2

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_embed.py
	$(BIN)/python benchmarks/bench_select.py
	$(BIN)/python benchmarks/bench_knn.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_distributed.py
	$(BIN)/python benchmarks/bench_lease.py

clean:
	rm -rf $(VENV) demo-run .pytest_cache
