# blockcrypt — build, test, demo, bench. Run as root on Debian 12.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STATE   ?= $(CURDIR)/demo-state

.PHONY: all deps test-deps venv build test fuzz demo demo-clean bench bench-quick clean install uninstall cli-doc

all: build

deps:
	bash scripts/install-deps.sh

$(VPY):
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip

venv: $(VPY)

# Editable install builds native/ into blockcrypt/_xts, _aead and _engine (*.so) in place.
build: deps venv
	$(VPY) -m pip install -q -e '.[test,bench]'

# The tests include the benchmark harness (bench/tests), which drives the peers.
test-deps:
	bash scripts/install-deps.sh --bench

test: test-deps build
	$(MAKE) -C native test sanitize
	$(VENV)/bin/pytest -q $(PYTEST_ARGS)

# docs/CLI.md from the click tree and blockcrypt/errors.py (tests/cli/test_contract.py fails when stale)
cli-doc: build
	$(VPY) -m blockcrypt.cli.reference --write docs/CLI.md

# the fuzzers of `make test` (header parser, vault REST surface; 8 s each there), for
# FUZZ_SECONDS each (default 300), with a seed per run (FUZZ_SEED)
FUZZ_SECONDS ?= 300
FUZZ_SEED    ?= $(shell date +%s)
fuzz: test-deps build
	BLOCKCRYPT_FUZZ_SECONDS=$(FUZZ_SECONDS) BLOCKCRYPT_FUZZ_SEED=$(FUZZ_SEED) \
	    $(VENV)/bin/pytest -q tests/fuzz tests/vault/test_fuzz_rest.py tests/fuse/test_fuzz_ops.py

demo: build
	STATE=$(STATE) VENV=$(VENV) bash scripts/demo.sh

demo-clean:
	STATE=$(STATE) VENV=$(VENV) bash scripts/demo.sh --teardown

bench: build
	bash scripts/install-deps.sh --bench
	$(VPY) bench/run.py --mode full

bench-quick: build
	bash scripts/install-deps.sh --bench
	$(VPY) bench/run.py --mode quick

# `make install`: a virtualenv in PREFIX with blockcrypt built from this tree (not editable),
# `blockcrypt` linked into BINDIR, the systemd units into UNITDIR (docs/OPERATIONS.md).
# Idempotent; `make uninstall` removes them again (never a state directory or a vault).
PREFIX  ?= /opt/blockcrypt
BINDIR  ?= /usr/local/bin
UNITDIR ?= /etc/systemd/system

install: deps
	PREFIX=$(PREFIX) BINDIR=$(BINDIR) UNITDIR=$(UNITDIR) PY=$(PY) bash scripts/install.sh install

uninstall:
	PREFIX=$(PREFIX) BINDIR=$(BINDIR) UNITDIR=$(UNITDIR) bash scripts/install.sh uninstall

clean:
	rm -rf build *.egg-info blockcrypt/_*.so $(VENV)
