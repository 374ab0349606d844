# `make demo` and `make test` set up .venv themselves (once) and then run. Setup ends by building every command's
# --help into the cache (seconds), so the first `patchdd COMMAND --help` is instant too.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SETUP_LOG := $(VENV)/setup.log
PYTEST_ARGS ?= -m "not slow"

.PHONY: setup test test-all docs demo panel toydata toy-prior toy-dit rehearsal bench-gpu clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@echo "setting up $(VENV) (log: $(SETUP_LOG)) ..."
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@( $(PY) -m pip install -q --upgrade pip && \
	   $(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1 && \
	   $(PY) -m pip install -q -e '.[dev,docs]' && \
	   { $(PY) -c 'from patchdd.cli import build_help_cache; build_help_cache()' || echo 'help cache not built'; } \
	  ) > $(SETUP_LOG) 2>&1 \
	  || (tail -n 30 $(SETUP_LOG); exit 1)
	@touch $(STAMP)
	@echo "$(VENV) ready"

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q

# The documentation site (MkDocs + Material + mkdocstrings) into build/site; tests/test_docs.py builds it strictly.
docs: $(STAMP)
	$(PY) -m mkdocs build --strict --quiet

toydata: $(STAMP)
	$(PY) cli.py toydata --out data/toy

# Retrain the committed toy diffusion prior (SD folder layout) in assets/toy_prior; see configs/prior/toy.yaml.
toy-prior: $(STAMP)
	test -d data/toy || $(PY) cli.py toydata --out data/toy
	$(PY) cli.py fit -c configs/prior/toy.yaml --model.export_dir assets/toy_prior

# The committed toy DiT prior (assets/toy_dit) of the generative rows: 8000 steps, about 45 CPU minutes; one torch
# thread, as it was trained, reproduces the committed weights bit for bit.
toy-dit: $(STAMP)
	test -d data/toy || $(PY) cli.py toydata --out data/toy
	OMP_NUM_THREADS=1 $(PY) cli.py fit -c configs/prior/toy_dit.yaml --model.export_dir assets/toy_dit

# The README's GPU quickstart and the ImageWoof recipe as written, with SD v1.5, DiT-XL/2 and ResNet-18 at their real
# sizes (random weights) on a 4-class ImageNet-shaped folder, on the CPU: each step's time and peak memory
# (tests/test_rehearsal.py; figures in BENCHMARKS.md).
rehearsal: $(STAMP)
	$(PY) -m pytest -q -s -m rehearsal tests/test_rehearsal.py

# Every throughput figure on one GPU (under 9 minutes on an H100), written into BENCHMARKS.md.
bench-gpu: $(STAMP)
	$(PY) bench/gpu_pack.py

demo: $(STAMP)
	$(PY) cli.py demo -c configs/demo/toy.yaml

# The fairness panel on the demo's sets (run make demo first): 4 methods x 4 protocols x IPC 1, 10 x 3 seeds.
panel: $(STAMP)
	$(PY) cli.py matrix -c configs/matrix/toy_panel.yaml --out runs/matrix/toy_panel

clean:
	rm -rf runs lightning_logs data/toy build/site
