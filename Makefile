# Two commands do all the set-up on a fresh machine:
#   make demo   creates .venv if missing, then pretrains, fine-tunes and exports on the digits
#   make test   creates .venv if missing, then runs the default test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# the pieces users import into their own Keras code, on the JAX backend too
BACKEND_NEUTRAL_TESTS := tests/test_layers.py tests/test_setups.py tests/test_reference_values.py \
	tests/test_optimizers.py tests/test_schedules.py

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

test-jax: $(STAMP)
	KERAS_BACKEND=jax $(BIN)/python -m pytest -q $(BACKEND_NEUTRAL_TESTS)

test-all: $(STAMP)
	$(BIN)/python -m pytest -q -m "slow or not slow"

bench: $(STAMP)
	$(BIN)/python bench/overhead.py

clean:
	rm -rf $(VENV) saved_models/*/
