# Two commands do all the set-up on a fresh machine:
#   make study   install into .venv (first time only), then run the representative-count ablation
#   make test    install into .venv (first time only), then lint and run the test suite
# Override the interpreter or the torch build, e.g. `make study PYTHON=python3.12 TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
BIN := $(VENV)/bin
STAMP := $(VENV)/.cbtlab-installed

.PHONY: install study test lint clean

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

test: lint
	$(BIN)/python -m pytest $(ARGS)

clean:
	rm -rf $(VENV)
