# `make demo` textures a scene in headless Blender; `make test` runs every test. Both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench addon clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first, so installing the project keeps it. This project's machines resolve it to a local CPU
	# build; PyPI's Linux wheel may be a CUDA build (several GB): add --index-url https://download.pytorch.org/whl/cpu
	# to stay on the CPU.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(PY) examples/texture_scene.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

addon: $(STAMP)
	$(PY) build_addon.py

clean:
	rm -rf dist build .pytest_cache
