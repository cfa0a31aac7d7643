"""`OneCycleMomentum`: cycle SGD's `momentum` or Adam's `beta_1` against a `OneCycle` rate.

Why a variable: Keras 3 optimizers keep `momentum` / `beta_1` as plain Python
floats and read them inside `update_step`, which `fit` traces once into a
`tf.function`, so the value is baked into the graph: assigning a new float to
`optimizer.momentum` between batches changes nothing (checked on Keras 3.15:
the weights come out identical). This callback swaps the float for a scalar
variable before the train step is traced (it rebuilds `model.train_function`)
and, inside the step, assigns it from `optimizer.iterations` just before the
update (it wraps the optimizer's `apply`); the traced step reads the variable,
so the update is exactly what an eager step with that float would do (the
tests compare against `run_eagerly=True`). Being in the step, it costs no
per-batch callback (Keras would wait for every batch) and follows each step
under `steps_per_execution > 1` too. At the end of training the float comes
back and the train function is rebuilt again.

The value is a pure function of `optimizer.iterations`, so a resumed run
continues the curve where it stopped. While training, `optimizer.get_config()`
still reports the original float, so checkpoints save and reload normally.

On the JAX backend the compiled step is stateless: the update uses the
scheduled value, but the variable seen from outside keeps its first value.

Example:

>>> import keras
>>> from transferkit.pieces.schedules import OneCycle
>>> schedule = OneCycle(total_steps=1000, max_lr=0.01)
>>> optimizer = keras.optimizers.SGD(schedule, momentum=0.9)
>>> callbacks = [OneCycleMomentum(schedule)]  # model.fit(..., callbacks=callbacks)
"""

from __future__ import annotations

import functools
from typing import Any

import keras

from transferkit.errors import SettingsError
from transferkit.pieces.schedules import OneCycle, check_schedule_options


class _ScheduledHyperparameter(keras.Variable):
    """A scalar variable standing in for an optimizer's float hyperparameter while it is scheduled.

    Comparisons with Python numbers answer for the float it replaced: SGD's
    `update_step` asks `if self.momentum != 0` while tracing, which a tensor
    cannot answer. Arithmetic and `ops.cast` read the variable.
    """

    def __init__(self, value: float):
        super().__init__(float(value), dtype="float32", trainable=False)
        self.replaced = float(value)

    def __eq__(self, other):
        if isinstance(other, (int, float)):
            return self.replaced == other
        return super().__eq__(other)

    def __ne__(self, other):
        if isinstance(other, (int, float)):
            return self.replaced != other
        return super().__ne__(other)


def _config_with(optimizer, name: str, value: float) -> dict:
    """`optimizer`'s config with hyperparameter `name` reported as the float it had before scheduling."""
    return {**type(optimizer).get_config(optimizer), name: value}


class OneCycleMomentum(keras.callbacks.Callback):
    """Set the optimizer's momentum each step from the 1cycle momentum curve.

    SGD (with `momentum > 0`) gets its `momentum` set; Adam, AdamW, Nadam,
    Adamax, Lamb and Lion get their `beta_1`. The value at a batch is
    `schedule.momentum(optimizer.iterations)`: `max_momentum` while the rate
    is low, `min_momentum` at the rate's peak. The original value is put back
    when training ends.

    Example:

    >>> cb = OneCycleMomentum(1000)  # fastai's cosine cycle over 1000 steps
    >>> round(float(cb.schedule.momentum(250)), 6)
    0.85

    Args:
        schedule: `OneCycle` or int. The rate schedule to mirror, or the total
            steps of fastai's default cycle (cosine, `pct_start=0.25`).
        max_momentum: Float. Momentum at the start and end. Defaults to `0.95`.
        min_momentum: Float. Momentum at the rate's peak. Defaults to `0.85`.

    Raises:
        SettingsError: (a ValueError) for momenta out of range; at train begin,
            for an optimizer without momentum to cycle.
    """

    def __init__(self, schedule: OneCycle | int, max_momentum: float = 0.95, min_momentum: float = 0.85):
        super().__init__()
        if isinstance(schedule, int) and not isinstance(schedule, bool):
            schedule = OneCycle(schedule, max_lr=1.0)
        if not isinstance(schedule, OneCycle):
            raise SettingsError(f"schedule must be a OneCycle or its total steps (int). Received: schedule={schedule!r}")
        if not 0 <= min_momentum <= max_momentum < 1:
            raise SettingsError("Expected 0 <= min_momentum <= max_momentum < 1. "
                                f"Received: min_momentum={min_momentum}, max_momentum={max_momentum}")
        self.schedule = schedule
        self.max_momentum = float(max_momentum)
        self.min_momentum = float(min_momentum)
        self._optimizer = self._name = self._variable = None

    @staticmethod
    def _attribute(optimizer) -> str | None:
        """The optimizer's momentum attribute (`momentum` or `beta_1`), None when it has none to cycle."""
        optimizer = getattr(optimizer, "inner_optimizer", optimizer)
        if isinstance(optimizer, keras.optimizers.SGD):
            return "momentum" if optimizer.momentum > 0 else None
        return "beta_1" if hasattr(optimizer, "beta_1") else None

    @classmethod
    def supports(cls, optimizer: keras.optimizers.Optimizer) -> bool:
        """Whether `optimizer` has a momentum this callback can cycle."""
        return cls._attribute(optimizer) is not None

    def on_train_begin(self, logs=None):
        name = self._attribute(self.model.optimizer)
        if name is None:
            raise SettingsError("OneCycleMomentum needs SGD with momentum > 0 or an optimizer with beta_1 "
                                f"(Adam, AdamW, Nadam). Received: optimizer={type(self.model.optimizer).__name__}")
        optimizer = getattr(self.model.optimizer, "inner_optimizer", self.model.optimizer)
        _release(optimizer, name)  # what a fit that raised left (Keras calls no on_train_end then)
        self._optimizer, self._name = optimizer, name
        original = getattr(optimizer, name)
        self._variable = _ScheduledHyperparameter(original)
        # object.__setattr__: untracked, so the optimizer's saved variables do not change
        object.__setattr__(optimizer, name, self._variable)
        object.__setattr__(optimizer, "get_config", functools.partial(_config_with, optimizer, name, original))
        # set inside the train step, from the step counter, just before the update: with a per-batch
        # callback Keras would wait for every batch (it cost half of a cached head stage's time)
        object.__setattr__(optimizer, "apply", functools.partial(self._apply, optimizer.apply, self.model.optimizer))
        self.model.make_train_function(force=True)

    def _apply(self, apply, counter, grads, trainable_variables=None):
        self._variable.assign(self.schedule.momentum(counter.iterations, self.max_momentum, self.min_momentum))
        return apply(grads, trainable_variables)

    def on_train_end(self, logs=None):
        if self._optimizer is None:
            return
        _release(self._optimizer, self._name)
        self._optimizer = self._name = self._variable = None
        self.model.make_train_function(force=True)


def _release(optimizer: keras.optimizers.Optimizer, name: str) -> None:
    """Put the float back in place of the scheduled `name`, and drop the instance's `get_config` and `apply`."""
    value = getattr(optimizer, name)
    if isinstance(value, _ScheduledHyperparameter):
        object.__setattr__(optimizer, name, value.replaced)
    vars(optimizer).pop("get_config", None)
    vars(optimizer).pop("apply", None)


def schedule_callbacks(name: str, learning_rate: Any, optimizer: keras.optimizers.Optimizer | None = None,
                       **options) -> list[keras.callbacks.Callback]:
    """The callbacks schedule `name` needs; pass them to `fit` with the optimizer built on `learning_rate`.

    `onecycle`: `OneCycleMomentum` for `learning_rate` (the `OneCycle` from
    `make_schedule`), left out when `optimizer` is given and has no momentum
    to cycle (plain SGD, RMSprop). `plateau`: `ReduceLROnPlateau` (Keras'
    defaults: monitor `val_loss`, factor 0.1, patience 10). Others: none.

    Example:

    >>> schedule_callbacks("exponential", 0.01)
    []
    """
    check_schedule_options(name, options)
    if name == "onecycle":
        if not isinstance(learning_rate, OneCycle):
            raise SettingsError(f"The onecycle callbacks need the OneCycle from make_schedule. "
                                f"Received: learning_rate={learning_rate!r}")
        if optimizer is not None and not OneCycleMomentum.supports(optimizer):
            return []
        momentum = {k: options[k] for k in ("max_momentum", "min_momentum") if k in options}
        return [OneCycleMomentum(learning_rate, **momentum)]
    if name == "plateau":
        return [keras.callbacks.ReduceLROnPlateau(**options)]
    return []
