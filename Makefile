# wsurgery: `make demo` and `make test` each set everything up on a fresh machine.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# torch is pinned to the CPU build this machine class keeps on disk; an unpinned torch pulls a multi-GB CUDA build.
TORCH  ?= torch==2.13.0

# mergekit, an oracle of the merge tests, pins its own safetensors, click and accelerate:
# it gets an environment of its own, and the tests run its mergekit-yaml.
PEERS  ?= .venv-peers
PEERS_STAMP := $(PEERS)/.installed

.PHONY: install peers demo test lint fixtures bench fuzz clean gpu-check

# the fused compare kernel is compiled at install: its source rebuilds it
$(STAMP): pyproject.toml Makefile hatch_build.py wsurgery/compare/_fused.c
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

$(PEERS_STAMP): Makefile
	test -x $(PEERS)/bin/python || $(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check "$(TORCH)"
	$(PEERS)/bin/python -m pip install --quiet --disable-pip-version-check "mergekit>=0.1.4,<0.1.5" "transformers>=4.45.2,<5"
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

demo: $(STAMP)
	@mkdir -p build/demo
	$(BIN)/wsurgery tie fixtures/tiny_lm.pt --src embedding.weight --dst projection.weight \
		-o build/demo/tiny_lm.tied.safetensors --force
	$(BIN)/wsurgery inspect build/demo/tiny_lm.tied.safetensors

# Without mergekit (no registry, say) the tests that need it skip and say why.
test: $(STAMP)
	-@$(MAKE) --no-print-directory peers || echo "note: mergekit could not be installed; its tests will skip" >&2
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
