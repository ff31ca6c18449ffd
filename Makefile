# wsurgery: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build this machine class keeps on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: install demo test lint fixtures bench fuzz clean gpu-check

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	@mkdir -p build/demo
	$(BIN)/wsurgery tie fixtures/tiny_lm.pt --src embedding.weight --dst projection.weight \
		-o build/demo/tiny_lm.tied.safetensors --force
	$(BIN)/wsurgery inspect build/demo/tiny_lm.tied.safetensors

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check wsurgery tests fixtures fuzz benchmarks
	$(BIN)/mypy wsurgery

fixtures: $(STAMP)
	$(BIN)/python fixtures/make_fixtures.py

clean:
	rm -rf build .pytest_cache

bench: $(STAMP)
	$(BIN)/python benchmarks/bench.py $(BENCH_ARGS)
	$(BIN)/python benchmarks/bench_merge.py $(MERGE_BENCH_ARGS)

fuzz: $(STAMP)
	$(BIN)/python fuzz/campaign.py --minutes $(or $(FUZZ_MINUTES),10)

# On a machine with a CUDA device and a CUDA build of torch: CUDA-marked tests, the library
# on the GPU, and a GPU diff benchmark against host-to-device bandwidth (JSON in build/gpu/).
# Without CUDA it says so and exits 0.
gpu-check: $(STAMP)
	$(BIN)/python benchmarks/gpu_check.py $(GPU_ARGS)
