"""`optimizer()`: the right class and the chapter's settings for each name, clipping passed through."""

import keras
import pytest

from transferkit.pieces.optimizers import OPTIMIZERS, optimizer

pytestmark = pytest.mark.backend_neutral  # also run on JAX by `make test-jax`

# name -> (class, settings), written from the chapter, not read from PRESETS
EXPECTED = {
    "sgd": (keras.optimizers.SGD, {"momentum": 0.0, "nesterov": False}),
    "momentum": (keras.optimizers.SGD, {"momentum": 0.9, "nesterov": False}),
    "nesterov": (keras.optimizers.SGD, {"momentum": 0.9, "nesterov": True}),
    "adam": (keras.optimizers.Adam, {"beta_1": 0.9, "beta_2": 0.999}),
    "adamw": (keras.optimizers.AdamW, {"beta_1": 0.9, "beta_2": 0.999}),
    "nadam": (keras.optimizers.Nadam, {"beta_1": 0.9, "beta_2": 0.999}),
    "rmsprop": (keras.optimizers.RMSprop, {"rho": 0.9}),
}


def test_optimizers_lists_every_name():
    assert set(OPTIMIZERS) == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_name_builds_its_class_with_the_chapters_settings(name):
    cls, settings = EXPECTED[name]
    opt = optimizer(name, learning_rate=0.01)
    assert type(opt) is cls
    assert float(opt.learning_rate) == pytest.approx(0.01)
    for key, value in settings.items():
        assert getattr(opt, key) == value, key


def test_default_is_nadam_at_1e_3():
    opt = optimizer()
    assert type(opt) is keras.optimizers.Nadam
    assert float(opt.learning_rate) == pytest.approx(1e-3)


def test_learning_rate_schedule_is_accepted():
    schedule = keras.optimizers.schedules.ExponentialDecay(0.1, decay_steps=10, decay_rate=0.5)
    opt = optimizer("sgd", learning_rate=schedule)
    assert opt._learning_rate is schedule
    assert float(opt.learning_rate) == pytest.approx(0.1)  # schedule(0)


def test_extra_arguments_override_the_preset():
    assert optimizer("momentum", momentum=0.95).momentum == 0.95


@pytest.mark.parametrize("arg", ["clipnorm", "clipvalue", "global_clipnorm"])
def test_clipping_arguments_are_passed_through(arg):
    opt = optimizer("adam", **{arg: 0.5})
    assert getattr(opt, arg) == 0.5
    others = {"clipnorm", "clipvalue", "global_clipnorm"} - {arg}
    assert all(getattr(opt, other) is None for other in others)


def test_unknown_name_names_the_value_and_the_choices():
    with pytest.raises(ValueError, match=r"Received: name='adagrad'") as info:
        optimizer("adagrad")
    assert all(name in str(info.value) for name in EXPECTED)


def test_non_positive_learning_rate_is_refused():
    with pytest.raises(ValueError, match=r"Received: learning_rate=0"):
        optimizer("sgd", learning_rate=0)
