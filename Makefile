# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, then pretrains, fine-tunes and exports on the digits
#   make test   creates .venv if missing, then runs the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-jax test-all bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/transferkit pretrain --recipe recipes/digits.toml
	$(BIN)/transferkit finetune --recipe recipes/digits.toml --from saved_models/digits-encoder --unfreeze-top 2 --label-fraction 0.05
	$(BIN)/transferkit export saved_models/digits-classifier

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the tests marked backend_neutral (the pieces, and a subset of the pipelines), on JAX
test-jax: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q -m "backend_neutral and not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) saved_models/*/
