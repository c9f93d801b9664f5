# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch goes in first, pinned, so nothing else pulls an unpinned (multi-GB CUDA) build. On our CPU
# machines this pin resolves to the CPU build kept on local disk; elsewhere pass your own, e.g.
# make demo TORCH="torch --index-url <PyTorch's CPU wheel index>" on a CPU box, TORCH=torch on a GPU one.
TORCH  ?= torch==2.13.0

.PHONY: demo test lint fetch clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

## demo: fetch SmolLM2-135M-Instruct, LoRA-tune it on the shipped date task, print before/after
demo: $(STAMP)
	$(PY) -m nbtune demo

## test: lint, then the whole test suite (tiny models, then the real SmolLM2)
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

## fetch: put the default model into the cache (NBTUNE_CACHE), nothing else
fetch: $(STAMP)
	$(PY) -m nbtune fetch

clean:
	rm -rf $(VENV) runs build *.egg-info
