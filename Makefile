# Two commands for a fresh machine:
#   make demo   -- create .venv, install everything, run the built-in demo
#   make test   -- create .venv, install everything, lint (ruff), run the test suite
#
# `make install` installs the package editable with the `dev` extra: every optional
# dependency (train, video, viz) plus the test, lint and docs tools.
#
# The PyTorch build is machine-specific, so it is chosen here and not in pyproject.toml.
# Override it for your machine, e.g. `make test TORCH_SPEC="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PY := $(VENV)/bin/python

.PHONY: demo test install bench asan docs clean clean-install

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/structvit demo

test: install
	$(PY) -m ruff check src tests
	$(PY) -m pytest -q

# The wheel alone (core dependencies only) in a fresh venv, run from outside the repo.
clean-install: install
	bash .ci/clean_install.sh

bench: install
	$(PY) -m structvit.bench op

# The CPU kernels built with AddressSanitizer (in a fresh cache) and their tests run on
# them; python is not instrumented, so the ASan and C++ runtimes are preloaded.
ASAN_PRELOAD = $(shell gcc -print-file-name=libasan.so):$(shell gcc -print-file-name=libstdc++.so)
asan: install
	STRUCTVIT_NATIVE_SANITIZE=address STRUCTVIT_CACHE=$$(mktemp -d) ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 \
	LD_PRELOAD="$(ASAN_PRELOAD)" $(PY) -m pytest -q -p no:cacheprovider -m "not slow" \
	tests/ops/test_native_boundary.py tests/ops/test_native_conv.py tests/ops/test_fused.py

# The documentation site into build/site (warnings are errors, as in CI).
docs: install
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache .hypothesis
