# memd: `make run` starts the daemon, `make test` runs the suite, `make docs` builds the
# documentation. All set themselves up on a fresh machine: a .venv with the project (all
# `make run` installs), plus the test extras for test and lint, the bench extras for
# bench and the docs extras for docs.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(wildcard ext/*.c ext/*.h)
PREFIX ?= rte
MEM_MB ?= 64
ARGS ?=

.PHONY: run test test-quick lint bench docs venv ext asan clean

# pyproject's build-system requires, quoted for the shell: `setup.py build_ext` (ext)
# runs in the venv, and Python 3.12's venvs have no setuptools.  (Python 3.10 has no
# tomllib; its venvs come with setuptools.)
BUILD_REQUIRES := $(shell $(PYTHON) -c "import shlex, tomllib; print(*map(shlex.quote, tomllib.load(open('pyproject.toml', 'rb'))['build-system']['requires']))" 2>/dev/null)

# What the daemon needs, nothing more (pyzmq, msgpack).
$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip $(BUILD_REQUIRES)
	$(PY) -m pip install -q -e .
	touch $@

# The extras, each with its own stamp: pytest, hypothesis and the linters; the peers
# the benchmarks compare with.
# pip install -e compiles the extension in place without the test hooks: each install
# drops the test build's stamp, and targets list their installs before `ext`.
$(VENV)/.installed-test: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[test]'
	rm -f memd/.ext-built
	touch $@

$(VENV)/.installed-bench: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[bench]'
	rm -f memd/.ext-built
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[docs]'
	rm -f memd/.ext-built
	touch $@

# The test build (setup.py always compiles afresh).
# memd/_ext.pyi: setup.py makes the C callables' text signatures from the stub
memd/.ext-built: $(VENV)/.installed $(EXT_SOURCES) memd/_ext.pyi
	MEMD_TEST_HOOKS=1 $(PY) setup.py -q build_ext --inplace
	touch $@

venv: $(VENV)/.installed
ext: memd/.ext-built

# Hugepages when we can get them (root: reserve + mount), else --no-huge.  ARGS go to
# memd: make run ARGS="--runtime-dir /x --huge-dir /y".
run: ext
	@if $(PY) -m memd.hugepages_admin --setup --pages 256; then \
		echo "memd: hugepages ready"; \
		exec $(VENV)/bin/memd --file-prefix $(PREFIX) -m $(MEM_MB) $(ARGS); \
	else \
		echo "memd: no hugepages here, running --no-huge"; \
		exec $(VENV)/bin/memd --file-prefix $(PREFIX) -m $(MEM_MB) --no-huge $(ARGS); \
	fi

test: $(VENV)/.installed-test ext
	$(PY) -m pytest -q tests

# everything but the minute-long fuzz runs (CI runs them all, through `make test`)
test-quick: $(VENV)/.installed-test ext
	$(PY) -m pytest -q -m "not slow" tests

lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check memd memd_client tests bench docs setup.py
	$(VENV)/bin/ruff format --check memd memd_client tests bench docs setup.py
	$(VENV)/bin/mypy
	# what a user's `mypy --strict` sees of the client and everything it imports
	$(VENV)/bin/mypy --strict -p memd_client
	$(VENV)/bin/clang-format --dry-run --Werror ext/*.c ext/*.h

bench: $(VENV)/.installed-bench ext
	$(PY) bench/init_bench.py

# HTML in docs/_build/html. -W -n: a warning (a broken reference, a public name without
# a docstring: docs/_ext/memd_docs.py) fails the build, as in CI.
docs: $(VENV)/.installed-docs ext
	$(VENV)/bin/sphinx-build -q -E -W -n --keep-going -b html docs docs/_build/html

# AddressSanitizer build of the extension, in place (run tests with
# LD_PRELOAD=$(shell gcc -print-file-name=libasan.so)).  Its objects go to their own
# dir, and the test build's stamp goes, so the next `make ext` (test, run) rebuilds
# without ASan; a wheel never ships it (setup.py always compiles afresh).
asan: venv
	rm -f memd/.ext-built
	MEMD_TEST_HOOKS=1 MEMD_ASAN=1 $(PY) setup.py -q build_ext --inplace -t build/asan

clean:
	rm -rf build memd/_ext*.so memd/.ext-built *.egg-info docs/_build
