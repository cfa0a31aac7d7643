"""Schedules and OneCycleMomentum: reference values, formulas written here independently, saving, resume."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
from helpers import assert_config_round_trip

from transferkit.pieces.callbacks import OneCycleMomentum
from transferkit.errors import SettingsError
from transferkit.pieces.schedules import (SCHEDULES, OneCycle, PowerDecay, exponential_schedule, make_schedule,
                                   one_cycle_momentum, piecewise_schedule, power_schedule, schedule_callbacks)

pytestmark = pytest.mark.backend_neutral  # also run on JAX by `make test-jax`


def values(schedule, steps):
    return np.array([float(schedule(s)) for s in steps])


def chapter_one_cycle(iterations, max_rate):
    """The chapter's OneCycleScheduler (Géron, 1cycle notebook), batch by batch."""
    start_rate = max_rate / 10
    last_iterations = iterations // 10 + 1
    half = (iterations - last_iterations) // 2
    last_rate = start_rate / 1000

    def interpolate(it, iter1, iter2, rate1, rate2):
        return (rate2 - rate1) * (it - iter1) / (iter2 - iter1) + rate1

    rates = []
    for it in range(iterations):
        if it < half:
            rates.append(interpolate(it, 0, half, start_rate, max_rate))
        elif it < 2 * half:
            rates.append(interpolate(it, half, 2 * half, max_rate, start_rate))
        else:
            rates.append(interpolate(it, 2 * half, iterations, start_rate, last_rate))
    return np.array(rates)


def test_linear_one_cycle_gives_the_chapter_reference_values():
    lr = OneCycle(total_steps=10750, max_lr=0.1, shape="linear")
    np.testing.assert_allclose(values(lr, [0, 4837, 9674]), [0.01, 0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose(values(lr, [10750, 20000]), [1e-5, 1e-5], rtol=1e-5)
    steps = [1, 1000, 2418, 4836, 4838, 7000, 9673, 9675, 10200, 10749]
    np.testing.assert_allclose(values(lr, steps), chapter_one_cycle(10750, 0.1)[steps], rtol=1e-5)


def test_cosine_one_cycle_follows_fastai_combined_cos():
    total, max_lr, div, div_final, pct = 1000, 0.02, 25.0, 1e5, 0.25
    lr = OneCycle(total, max_lr)

    def sched_cos(start, end, pos):
        return start + (1 + math.cos(math.pi * (1 - pos))) * (end - start) / 2

    def fastai(step):
        pos = step / total
        if pos < pct:
            return sched_cos(max_lr / div, max_lr, pos / pct)
        return sched_cos(max_lr, max_lr / div_final, (pos - pct) / (1 - pct))

    np.testing.assert_allclose(values(lr, [0, 250, 1000]), [max_lr / div, max_lr, max_lr / div_final], rtol=1e-5)
    np.testing.assert_allclose(float(lr(125)), (max_lr / div + max_lr) / 2, rtol=1e-5)
    np.testing.assert_allclose(float(lr(625)), (max_lr + max_lr / div_final) / 2, rtol=1e-5)
    steps = [1, 37, 200, 251, 400, 777, 999]
    np.testing.assert_allclose(values(lr, steps), [fastai(s) for s in steps], rtol=1e-5, atol=1e-10)  # float32
    assert float(lr(5000)) == pytest.approx(max_lr / div_final, rel=1e-5)


def test_momentum_mirrors_the_rate_high_low_high():
    cosine = OneCycle(1000, 0.01, pct_start=0.3)
    np.testing.assert_allclose([float(cosine.momentum(s)) for s in (0, 300, 1000, 2000)], [0.95, 0.85, 0.95, 0.95],
                               rtol=1e-6)
    mid = 0.95 + (1 + math.cos(math.pi * 0.5)) * (0.85 - 0.95) / 2
    assert float(cosine.momentum(150)) == pytest.approx(mid, rel=1e-6)
    assert float(one_cycle_momentum(150, 1000, 0.3)) == float(cosine.momentum(150))
    linear = OneCycle(10750, 0.1, shape="linear")
    np.testing.assert_allclose([float(linear.momentum(s)) for s in (0, 4837, 9674, 10750)], [0.95, 0.85, 0.95, 0.95],
                               rtol=1e-6)
    assert float(linear.momentum(4837, max_momentum=0.9, min_momentum=0.8)) == pytest.approx(0.8)


def test_named_decays_follow_the_chapter_formulas():
    steps = [0, 10, 50, 200]
    np.testing.assert_allclose(values(power_schedule(0.01, 20, power=2), steps),
                               [0.01 / (1 + s / 20) ** 2 for s in steps], rtol=1e-6)
    np.testing.assert_allclose(values(exponential_schedule(0.01, 20), steps), [0.01 * 0.1 ** (s / 20) for s in steps],
                               rtol=1e-5)
    np.testing.assert_allclose(values(piecewise_schedule([10, 50], [0.01, 0.005, 0.001]), [0, 11, 51]),
                               [0.01, 0.005, 0.001], rtol=1e-6)


@pytest.mark.parametrize("schedule", [OneCycle(100, 0.1, div=10.0, pct_start=0.3, shape="linear"),
                                      PowerDecay(0.01, 20, power=2.0)], ids=["OneCycle", "PowerDecay"])
def test_schedule_config_round_trips(schedule):
    assert_config_round_trip(schedule)


@pytest.mark.parametrize("kwargs, received", [
    (dict(total_steps=0, max_lr=0.1), "total_steps=0"),
    (dict(total_steps=10, max_lr=-1), "max_lr=-1"),
    (dict(total_steps=10, max_lr=0.1, pct_start=1.5), "pct_start=1.5"),
    (dict(total_steps=10, max_lr=0.1, shape="triangle"), "shape='triangle'"),
])
def test_one_cycle_rejects_bad_arguments(kwargs, received):
    with pytest.raises(ValueError, match=f"Received: {received}"):
        OneCycle(**kwargs)


def test_make_schedule_gives_a_rate_for_every_name():
    for name in SCHEDULES:
        assert make_schedule(name, 0.01, total_steps=100) is not None
    assert make_schedule("constant", 0.01, 100) == 0.01
    assert make_schedule("plateau", 0.01, 100, patience=3) == 0.01
    assert isinstance(make_schedule("onecycle", 0.01, 100, shape="linear", max_momentum=0.9), OneCycle)
    for name in ("power", "exponential"):  # unset steps_per_decay: a tenth of the rate at the end
        assert float(make_schedule(name, 0.01, 1000)(1000)) == pytest.approx(0.001, rel=0.01)
    piecewise = make_schedule("piecewise", 0.01, 100)
    np.testing.assert_allclose(values(piecewise, [0, 60, 90]), [0.01, 0.001, 0.0001], rtol=1e-6)


def test_make_schedule_rejects_unknown_names_and_options():
    with pytest.raises(SettingsError, match="Received: schedule='cyclic'"):
        make_schedule("cyclic", 0.01, 100)
    with pytest.raises(SettingsError, match="Received: patience"):
        make_schedule("onecycle", 0.01, 100, patience=3)
    with pytest.raises(SettingsError, match="Received: learning_rate=0"):
        make_schedule("constant", 0, 100)


def test_schedule_callbacks_give_what_each_schedule_needs():
    one_cycle = make_schedule("onecycle", 0.01, 100)
    callbacks = schedule_callbacks("onecycle", one_cycle, keras.optimizers.Adam(), min_momentum=0.8)
    assert [type(c) for c in callbacks] == [OneCycleMomentum] and callbacks[0].min_momentum == 0.8
    assert schedule_callbacks("onecycle", one_cycle, keras.optimizers.SGD()) == []  # no momentum to cycle
    (plateau,) = schedule_callbacks("plateau", 0.01, factor=0.5, patience=2)
    assert isinstance(plateau, keras.callbacks.ReduceLROnPlateau) and (plateau.factor, plateau.patience) == (0.5, 2)
    assert schedule_callbacks("power", make_schedule("power", 0.01, 100)) == []


def tiny_model(optimizer, run_eagerly=False, steps_per_execution=1):
    keras.utils.set_random_seed(1)
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)])
    model.compile(optimizer, "mse", run_eagerly=run_eagerly, steps_per_execution=steps_per_execution)
    return model


def regression_data(n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3)).astype("float32")
    return x, (x @ np.array([[1.0], [-2.0], [0.5]])).astype("float32")


class EagerMomentumReference(keras.callbacks.Callback):
    """The reference: in an eager step a new float attribute is read each batch, so setting it is enough."""

    def __init__(self, schedule, name):
        super().__init__()
        self.schedule, self.name = schedule, name

    def on_train_batch_begin(self, batch, logs=None):
        self.original = getattr(self, "original", getattr(inner(self.model.optimizer), self.name))
        value = float(self.schedule.momentum(self.model.optimizer.iterations))
        setattr(inner(self.model.optimizer), self.name, value)

    def on_train_end(self, logs=None):
        setattr(inner(self.model.optimizer), self.name, self.original)


def inner(optimizer):
    """The optimizer that holds the momentum: the one inside a LossScaleOptimizer (mixed precision)."""
    return getattr(optimizer, "inner_optimizer", optimizer)


@pytest.mark.parametrize("make_optimizer, name", [
    (lambda lr: keras.optimizers.SGD(lr, momentum=0.9), "momentum"),
    (lambda lr: keras.optimizers.Adam(lr, beta_1=0.9), "beta_1"),
    (lambda lr: keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(lr, beta_1=0.9)), "beta_1"),
], ids=["SGD", "Adam", "Adam-loss-scaled"])
@pytest.mark.parametrize("steps_per_execution", [1, 4])
def test_one_cycle_momentum_changes_the_update_exactly_as_an_eager_step(make_optimizer, name, steps_per_execution):
    x, y = regression_data()
    schedule = OneCycle(total_steps=16, max_lr=0.05)
    fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)
    cycled = tiny_model(make_optimizer(schedule), steps_per_execution=steps_per_execution)
    seen = []
    observe = keras.callbacks.LambdaCallback(
        on_train_batch_end=lambda batch, logs: seen.append(float(getattr(inner(cycled.optimizer), name))))
    cycled.fit(x, y, callbacks=[OneCycleMomentum(schedule), observe], **fit)
    reference = tiny_model(make_optimizer(schedule), run_eagerly=True)
    reference.fit(x, y, callbacks=[EagerMomentumReference(schedule, name)], **fit)
    plain = tiny_model(make_optimizer(schedule))
    plain.fit(x, y, **fit)

    if keras.backend.backend() == "tensorflow" and steps_per_execution == 1:  # JAX: see OneCycleMomentum
        np.testing.assert_allclose(seen, [float(schedule.momentum(s)) for s in range(16)], rtol=1e-6)
    for a, b in zip(cycled.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert not all(np.allclose(a, b, atol=1e-6) for a, b in zip(cycled.get_weights(), plain.get_weights()))
    # restored at the end: the float is back, and the next fit (no callback) uses it again
    assert getattr(inner(cycled.optimizer), name) == 0.9 and type(getattr(inner(cycled.optimizer), name)) is float
    assert inner(cycled.optimizer).get_config()[name] == 0.9
    cycled.fit(x, y, **fit)
    reference.fit(x, y, **fit)
    for a, b in zip(cycled.get_weights(), reference.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_one_cycle_momentum_after_a_fit_that_raised_starts_from_the_original_float():
    # Keras calls no on_train_end when fit raises: the next OneCycleMomentum must not take the stand-in
    x, y = regression_data()
    schedule = OneCycle(total_steps=16, max_lr=0.05)
    fit = dict(batch_size=8, epochs=2, shuffle=False, verbose=0)

    def stop(batch, logs):
        if batch == 3:
            raise KeyboardInterrupt

    interrupted = tiny_model(keras.optimizers.Adam(schedule, beta_1=0.9))
    with pytest.raises(KeyboardInterrupt):
        interrupted.fit(x, y, callbacks=[OneCycleMomentum(schedule), keras.callbacks.LambdaCallback(
            on_train_batch_end=stop)], **fit)
    interrupted.fit(x, y, callbacks=[OneCycleMomentum(schedule)], **fit)
    assert interrupted.optimizer.beta_1 == 0.9 and type(interrupted.optimizer.beta_1) is float
    assert interrupted.optimizer.get_config()["beta_1"] == 0.9 and "apply" not in vars(interrupted.optimizer)


def test_one_cycle_momentum_needs_a_momentum_to_cycle():
    x, y = regression_data()
    model = tiny_model(keras.optimizers.SGD(0.01))
    with pytest.raises(SettingsError, match="Received: optimizer=SGD"):
        model.fit(x, y, callbacks=[OneCycleMomentum(10)], verbose=0)
    with pytest.raises(ValueError, match="Received: min_momentum=0.96"):
        OneCycleMomentum(10, min_momentum=0.96)


class SaveAt(keras.callbacks.Callback):
    def __init__(self, step, path):
        super().__init__()
        self.step, self.path = step, path

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) == self.step:
            self.model.save(self.path)


def test_one_cycle_model_saved_mid_training_resumes_at_the_same_step(tmp_path):
    x, y = regression_data()
    schedule = OneCycle(total_steps=16, max_lr=0.05)
    model = tiny_model(keras.optimizers.SGD(schedule, momentum=0.9))
    path = tmp_path / "mid.keras"
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[OneCycleMomentum(schedule), SaveAt(5, path)])

    reloaded = keras.saving.load_model(path)
    assert isinstance(reloaded.optimizer.learning_rate, type(model.optimizer.learning_rate))
    assert int(reloaded.optimizer.iterations) == 5
    assert reloaded.optimizer.momentum == 0.9  # the saved config holds the float, not the cycling variable
    assert float(reloaded.optimizer.learning_rate) == pytest.approx(float(schedule(5)), rel=1e-6)
    assert float(reloaded.optimizer.learning_rate) != pytest.approx(float(schedule(0)))
    reloaded.train_on_batch(x[:8], y[:8])
    assert float(reloaded.optimizer.learning_rate) == pytest.approx(float(schedule(6)), rel=1e-6)
