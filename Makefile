# The two commands a newcomer needs: `make run` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev
OUT ?= out

.PHONY: run test test-slow lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU wheel first: an unpinned torch pulls a multi-GB CUDA build.
$(STAMP_RUN): pyproject.toml | $(PY)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(PY)
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q -e ".[dev]"
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(VENV)/bin/wsi-pipeline run sample_slides --out $(OUT) --bf16 auto

test: $(STAMP_DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/python -m pytest -q -m "not slow and not openvino"
	$(VENV)/bin/python -m pytest -q -m openvino

test-slow: $(STAMP_DEV)
	$(VENV)/bin/python -m pytest -q -m slow

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(OUT) .pytest_cache .ruff_cache
