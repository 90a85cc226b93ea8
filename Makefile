# The two commands: `make demo` and `make test`. Each builds .venv from nothing when it is missing.
# extra arguments for the demo targets, e.g. make demo ARGS="--set train.precision=fp32"
ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test test-slow lint bench clean

$(STAMP): pyproject.toml scripts/setup_venv.sh
	bash scripts/setup_venv.sh

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m copa demo --out runs/demo $(ARGS)

demo-quick: $(STAMP)
	$(PY) -m copa demo --quick --out runs/demo-quick $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q

test-slow: $(STAMP)
	$(PY) -m pytest -q -m slow

lint: $(STAMP)
	$(PY) -m ruff check src tests scripts
	$(PY) -m ruff format --check src tests scripts

bench: $(STAMP)
	$(PY) -m copa bench --config configs/base.yaml --out runs/bench

clean:
	rm -rf runs .pytest_cache
