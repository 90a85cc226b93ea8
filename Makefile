# The two commands: `make demo` and `make test`. Each builds .venv from nothing when it is missing.
# extra arguments for the demo targets, e.g. make demo ARGS="--set train.precision=fp32"
ARGS ?=
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo demo-quick test test-slow lint bench stem-asset clean

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

# the image stem's warm start shipped in src/copa/assets (what the demo's trunk starts from): 2,000
# steps naming the objects of 10,000 synthetic images of seed 1000 (none of them a demo image),
# ~4 min with bf16; BENCHMARKS.md, session 20
STEM_RUN := runs/stem-asset
stem-asset: $(STAMP)
	$(PY) -m copa data synth --config configs/pretrain_tiny.yaml --out $(STEM_RUN)/aux --n-train 10000 --n-val 100 --n-test 0 --seed 1000
	$(PY) -m copa stem-stage --config configs/pretrain_tiny.yaml --set data.val=$(STEM_RUN)/aux/val.json --set seed=0 --records $(STEM_RUN)/aux/train_all_boxes.json --steps 2000 --batch 32 --out $(STEM_RUN)/stage $(ARGS)
	cp $(STEM_RUN)/stage/stem.safetensors src/copa/assets/stem_tiny.safetensors

clean:
	rm -rf runs .pytest_cache
