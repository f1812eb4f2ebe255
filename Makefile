# Two commands do all the set-up on a fresh machine:
#   make study   install into .venv (first time only), then run the representative-count ablation
#   make test    install into .venv (first time only), then lint and run the test suite
# Override the interpreter or the torch build, e.g. `make study PYTHON=python3.12 TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbtlab-installed

.PHONY: install study test lint browser services gpu-carry clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

study: $(STAMP)
	$(BIN)/python studies/rep_count_ablation.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The browser test (tests/test_dashboards_browser.py) drives Debian's chromium: install it when
# missing (as root, or through passwordless sudo); without it that test is skipped (CI, which
# sets CBTLAB_REQUIRE_BROWSER=1, fails it instead).
browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    $$SUDO apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
	  echo "warning: could not install chromium: the browser test will be skipped"

# The store tests (tests/test_stores.py) start PostgreSQL themselves (tests/services.py): install
# Debian's server when missing; without it they are skipped (CI, which sets
# CBTLAB_REQUIRE_SERVICES=1, fails them instead).
services:
	@test -x "$$(ls -d /usr/lib/postgresql/*/bin/postgres 2>/dev/null | tail -1)" || \
	  { if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	    $$SUDO apt-get update -q && \
	    $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql; } || \
	  echo "warning: could not install postgresql: the store tests will be skipped"

test: lint browser services
	$(BIN)/python -m pytest $(ARGS)

# What a bare GPU machine (torch, timm, triton; no network) needs besides this checkout for the
# GPU check and tests (studies/gpu_acceptance.sh picks both up): the three small pure-Python
# wheels it lacks, unpacked into carry/site, and the digits shards built into digits_cache/
# (scikit-learn, here). docs/gpu.md, "On a bare GPU machine".
gpu-carry: $(STAMP)
	rm -rf carry && mkdir -p carry/site
	$(BIN)/python -m pip download --quiet --no-deps --only-binary=:all: -d carry \
	  webdataset braceexpand cloudpickle
	for w in carry/*.whl; do $(BIN)/python -m zipfile -e "$$w" carry/site || exit 1; done
	$(BIN)/python data_pipelines/prepare_digits.py --set data.cache_dir=digits_cache
	@du -sh carry digits_cache

clean:
	rm -rf $(VENV)
