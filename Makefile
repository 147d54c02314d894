# Two entry points; each builds .venv from requirements.txt on first use.
#   make app    start the web app on the shipped checkpoint (http://127.0.0.1:7860)
#   make test   run the whole test suite (browser tests skip without Chromium, except in CI)
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python

.PHONY: app test lint gpu-check
app: $(VENV)/.installed
	GRADIO_ANALYTICS_ENABLED=False $(PY) app.py $(ARGS)

test: $(VENV)/.installed
	GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest $(ARGS)

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

# On a machine with a CUDA GPU: the CUDA-marked tests, then GPU timings (PY=python3 to use the machine's torch)
gpu-check:  # PYTHONPATH: a bare GPU machine's python has not installed this checkout
	PYTHONPATH=$(CURDIR) GRADIO_ANALYTICS_ENABLED=False $(PY) -m pytest -m cuda -q tests/test_cuda.py
	PYTHONPATH=$(CURDIR) $(PY) bench/gpu_timings.py $(ARGS)

# The pinned set, then this checkout as an editable package (vggattn importable anywhere, console scripts)
$(VENV)/.installed: requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e .
	touch $@
