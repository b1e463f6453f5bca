# `make demo` textures a scene in headless Blender; `make test` runs every test. Both create .venv first,
# from the lock (locks/dev-linux.txt): the exact versions, with hashes, that were tested together.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEV_LOCK := locks/dev-linux.txt
PLATFORMS := linux windows macos
# The installer's SUPPORTED_PYTHON, by lock (its LOCKS table): each backend lock must install there from wheels.
# Python 3.11: Blender 4.2-5.x's own Python (the installer's first choice) and bpy 5.0.1's; 3.10: Blender 3.4-4.1's.
LOCK_PYTHONS := 3.11 3.12
PY310_LOCK_PYTHONS := 3.10
# torch is left out: the installer picks its CPU or CUDA build (locks/uv.toml keeps torch's own dependencies out too).
LOCK_ARGS := --config-file locks/uv.toml --generate-hashes --no-emit-package torch \
	--custom-compile-command "make lock" --quiet
LATEST := build/latest-venv
# The Khronos glTF validator (npm, pinned in tools/gltf/package-lock.json): the GLB export tests and the demo run it.
GLTF_TOOLS := tools/gltf
GLTF_STAMP := $(GLTF_TOOLS)/node_modules/.installed

.PHONY: demo test test-latest lock lint bench addon clean

$(STAMP): pyproject.toml $(DEV_LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch pinned first, so installing the project keeps it. This project's machines resolve it to a local CPU
	# build; PyPI's Linux wheel may be a CUDA build (several GB): add --index-url https://download.pytorch.org/whl/cpu
	# to stay on the CPU.
	$(PY) -m pip install -q torch==2.13.0
	# The lock has every package but torch: pip's hash checking accepts the torch already there (it downloads
	# nothing for it) and refuses to fetch anything the lock lacks. (uv pip install refuses torch without a hash
	# unless given --no-deps; Install Backend uses pip as here, see locks/README.md.)
	$(PY) -m pip install -q --require-hashes -r $(DEV_LOCK)
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# Without npm the validator's tests skip (and fail under CI=true): install Node.js 18+ to run them.
$(GLTF_STAMP): $(GLTF_TOOLS)/package-lock.json
	if command -v npm >/dev/null; then npm ci --prefix $(GLTF_TOOLS) --no-audit --no-fund && touch $@; \
	else echo "npm not found: the glTF validator tests will skip"; fi

demo: $(STAMP) $(GLTF_STAMP)
	$(PY) examples/texture_scene.py

test: $(STAMP) $(GLTF_STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest

# Refresh the locks to the newest versions pyproject.toml allows, within locks/constraints.txt (known breaks).
# The backend's locks take the dev lock's versions (bpy holds numpy below 2), so users get what the tests ran.
# The 3.10 locks start as a copy of the 3.11 lock: without --upgrade uv keeps an output file's pins wherever they
# resolve (on 3.10 too) and picks the newest that does for the rest (accelerate 1.16 needs 3.11). The dev lock
# cannot constrain them: a hard pin that needs 3.11 would fail the resolve instead of being replaced.
lock: $(STAMP)
	$(PY) -m uv pip compile pyproject.toml --extra dev -c locks/constraints.txt $(LOCK_ARGS) --upgrade \
		--python-version 3.11 --python-platform linux -o $(DEV_LOCK)
	for platform in $(PLATFORMS); do \
		$(PY) -m uv pip compile pyproject.toml -c $(DEV_LOCK) $(LOCK_ARGS) --upgrade \
			--python-version 3.11 --python-platform $$platform -o locks/backend-$$platform.txt || exit 1; \
		cp locks/backend-$$platform.txt locks/backend-$$platform-py310.txt; \
		$(PY) -m uv pip compile pyproject.toml -c locks/constraints.txt $(LOCK_ARGS) \
			--python-version 3.10 --python-platform $$platform -o locks/backend-$$platform-py310.txt || exit 1; \
		for python in $(LOCK_PYTHONS); do $(call wheels_for,backend-$$platform.txt,$$python) done; \
		for python in $(PY310_LOCK_PYTHONS); do $(call wheels_for,backend-$$platform-py310.txt,$$python) done; \
	done

# Fails unless every package of lock $(1) has a wheel for $$platform and Python $(2).
wheels_for = $(PY) -m uv pip compile locks/$(1) --no-deps --only-binary :all: --quiet \
	--python-platform $$platform --python-version $(2) -o /dev/null || exit 1;

# Opt-in: the newest versions pyproject.toml allows, no lock and no known-break constraints, in a throw-away venv
# (.venv is left as it is), then the whole suite: an upstream release that breaks us shows here before users see it.
test-latest: $(STAMP)
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q torch==2.13.0
	$(PY) -m uv pip install --quiet --python $(LATEST)/bin/python -e '.[dev]'
	$(PY) -m uv pip list --python $(LATEST)/bin/python | grep -iE '^(diffusers|transformers|peft) '
	# SDTEX_BACKEND_PYTHON: the add-on's tests start their workers with it too, not with the checkout's .venv
	SDTEX_BACKEND_PYTHON=$(CURDIR)/$(LATEST)/bin/python $(LATEST)/bin/python -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks

addon: $(STAMP)
	$(PY) build_addon.py

clean:
	rm -rf dist build .pytest_cache
