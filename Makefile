# Two commands: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# torch goes in first, pinned, so nothing else pulls an unpinned (multi-GB CUDA) build. On our CPU
# machines this pin resolves to the CPU build kept on local disk; elsewhere pass your own, e.g.
# make demo TORCH="torch --index-url <PyTorch's CPU wheel index>" on a CPU box, TORCH=torch on a GPU one.
TORCH  ?= torch==2.13.0
# The real-browser test drives Debian's Chromium (never a browser downloaded by Playwright).
CHROMIUM := /usr/bin/chromium
SUDO     := $(shell [ "$$(id -u)" -ne 0 ] && command -v sudo)

.PHONY: demo notebooks test lint fetch clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

## demo: fetch SmolLM2-135M-Instruct, then execute notebooks/01-quickstart.ipynb headless: a real LoRA
## fine-tune on the shipped date task; prints what it learned and writes notebooks/01-quickstart.html
demo: $(STAMP)
	$(PY) -m nbtune fetch
	$(PY) notebooks/execute.py --summary notebooks/01-quickstart.ipynb

## notebooks: execute every notebook headless; HTML next to each, wall time and kernel peak RSS per notebook
notebooks: $(STAMP)
	$(PY) -m nbtune fetch
	$(PY) notebooks/execute.py

## test: lint, then the whole test suite (tiny models, the real SmolLM2, JupyterLab in a real browser)
test: $(STAMP) $(CHROMIUM)
	$(PY) -m ruff check .
	$(PY) -m pytest

$(CHROMIUM):
	$(SUDO) apt-get update
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium

lint: $(STAMP)
	$(PY) -m ruff check .

## fetch: put the default model into the cache (NBTUNE_CACHE), nothing else
fetch: $(STAMP)
	$(PY) -m nbtune fetch

clean:
	rm -rf $(VENV) runs notebooks/runs exports notebooks/exports notebooks/*.html build *.egg-info
