# memd: `make run` starts the daemon, `make test` runs the suite. Both set
# themselves up on a fresh machine (a .venv with the project and its test deps).

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
EXT_SOURCES := $(wildcard ext/*.c ext/*.h)
PREFIX ?= rte
MEM_MB ?= 64

.PHONY: run test test-quick lint bench venv ext asan clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench]'
	touch $@

# The test build (setup.py always compiles afresh: pip install -e builds the same .so
# without the hooks).
memd/.ext-built: $(VENV)/.installed $(EXT_SOURCES)
	MEMD_TEST_HOOKS=1 $(PY) setup.py -q build_ext --inplace
	touch $@

venv: $(VENV)/.installed
ext: memd/.ext-built

# Hugepages when we can get them (root: reserve + mount), else --no-huge.
run: ext
	@if $(PY) -m memd.hugepages_admin --setup --pages 256; then \
		echo "memd: hugepages ready"; exec $(VENV)/bin/memd --file-prefix $(PREFIX) -m $(MEM_MB); \
	else \
		echo "memd: no hugepages here, running --no-huge"; \
		exec $(VENV)/bin/memd --file-prefix $(PREFIX) -m $(MEM_MB) --no-huge; \
	fi

test: ext
	$(PY) -m pytest -q tests

# everything but the minute-long fuzz runs (CI runs them all, through `make test`)
test-quick: ext
	$(PY) -m pytest -q -m "not slow" tests

lint: venv
	$(VENV)/bin/ruff check memd memd_client tests bench setup.py
	$(VENV)/bin/ruff format --check memd memd_client tests bench setup.py
	$(VENV)/bin/mypy
	$(VENV)/bin/clang-format --dry-run --Werror ext/*.c ext/*.h

bench: ext
	$(PY) bench/init_bench.py

# AddressSanitizer build of the extension (run tests with LD_PRELOAD=$(shell gcc -print-file-name=libasan.so))
asan: venv
	MEMD_TEST_HOOKS=1 MEMD_ASAN=1 $(PY) setup.py -q build_ext --inplace

clean:
	rm -rf build memd/_ext*.so memd/.ext-built *.egg-info
