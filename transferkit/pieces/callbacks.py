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

import contextlib
import math

import functools

import keras

from transferkit.errors import SettingsError
from transferkit.pieces.schedules import OneCycle


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


class StopOnDivergence(keras.callbacks.Callback):
    """End training with a clear error when it diverges, instead of letting it "succeed".

    Diverged means: a non-finite loss after any batch; at an epoch's end, a
    non-finite weight, or a training loss above `growth` times the loss of the
    first batch (the loss of the weights training started from). Unlike
    `keras.callbacks.TerminateOnNaN`, which ends `fit` as if it had finished,
    this raises `TransferkitError`, so nothing after it (a backup at that epoch's
    end, saving, the next stage) runs on broken weights; put it before any
    callback that saves. The message names the stage, epoch, step and learning
    rate, and the remedies.

    Example:

    >>> model.fit(x, y, callbacks=[StopOnDivergence("head", learning_rate=0.01)])   # doctest: +SKIP

    Args:
        stage: String. The stage's name, for the message. Defaults to `"training"`.
        growth: Float or None. The bound on the epoch loss, as a multiple of
            the first batch's loss; `None` checks finiteness alone. Defaults
            to `10.0`.
        learning_rate: Float or None. The stage's (peak) rate, for the message.
            Defaults to `None`.

    Raises:
        TransferkitError: from `fit`, when training diverges.
    """

    # where Keras dispatches batch hooks to a worker thread (JAX; not TensorFlow, whose backend Keras
    # marks not thread-safe) the error comes at a later batch or at the epoch's end, before any
    # epoch-end callback (such as a backup) runs
    async_safe = True

    def __init__(self, stage: str = "training", growth: float | None = 10.0, learning_rate: float | None = None):
        super().__init__()
        if growth is not None and not growth > 1:
            raise SettingsError(f"growth must be a number > 1 or None. Received: growth={growth!r}")
        self.stage, self.growth, self.learning_rate = stage, growth, learning_rate
        self.first_loss: float | None = None
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is None:
            return
        loss = float(loss)
        if not math.isfinite(loss):
            self._fail(f"the loss became {loss}", f"step {batch + 1}")
        if self.first_loss is None:
            self.first_loss = loss

    def on_epoch_end(self, epoch, logs=None):
        ops = keras.ops  # counted where the weights are: no copy of the whole model every epoch
        broken = sum(int(ops.convert_to_numpy(ops.sum(ops.cast(ops.logical_not(ops.isfinite(w)), "int32"))))
                     for w in self.model.weights)
        if broken:
            self._fail(f"{broken} weights became NaN or infinite", "its end")
        loss = (logs or {}).get("loss")
        if self.growth is not None and loss is not None and self.first_loss is not None and \
                float(loss) > self.growth * max(self.first_loss, 1e-12):
            self._fail(f"the loss grew to {float(loss):.4g}, over {self.growth:g} times its first value "
                       f"({self.first_loss:.4g})", "its end")

    def _fail(self, what: str, where: str) -> None:
        from transferkit.errors import TransferkitError

        rate = "" if self.learning_rate is None else f" at learning rate {self.learning_rate:.3g}"
        raise TransferkitError(
            f"Training diverged in stage {self.stage}, epoch {self._epoch + 1}, {where}{rate}: {what}; "
            "lower the learning rate (--lr), let the LR finder choose it (--lr auto) or clip the gradients "
            "(--clipnorm 1.0)."
        )


class StopOnNaN(StopOnDivergence):
    """`StopOnDivergence` that checks the loss and weights for NaN and infinity alone (no growth bound).

    Example:

    >>> model.fit(x, y, callbacks=[StopOnNaN("head")])    # doctest: +SKIP

    Args:
        stage: String. The stage's name, for the message. Defaults to `"training"`.
    """

    def __init__(self, stage: str = "training"):
        super().__init__(stage, growth=None)


class ResumableEarlyStopping(keras.callbacks.EarlyStopping):
    """Keras's `EarlyStopping` whose progress a backup can keep, so a resumed stage stops where it would have.

    `state()` gives the best value and epoch, the epochs waited and the best
    weights; `load_state()` puts them back. With `restore_best_weights=True`
    (the default here) the model ends with its best epoch's weights.

    Example:

    >>> stop = ResumableEarlyStopping(monitor="val_loss", patience=20)
    >>> stop.load_state(stop.state())

    Args:
        monitor: String. The logged quantity to watch. Defaults to `"val_loss"`.
        patience: Int. Epochs without improvement before stopping. Defaults to `20`.
        ema: Bool. The optimizer keeps a moving average of the weights (`use_ema=True`):
            keep the average's values as the best weights. Defaults to `False`.
        **kwargs: Any other `keras.callbacks.EarlyStopping` argument.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 20, ema: bool = False, **kwargs):
        kwargs.setdefault("restore_best_weights", True)
        super().__init__(monitor=monitor, patience=patience, **kwargs)
        self.ema = ema
        self._loaded = None

    def on_epoch_end(self, epoch, logs=None):
        if not self.ema:
            return super().on_epoch_end(epoch, logs)
        with ema_weights_in(self.model):  # the weights judged (validation swaps them in) are the ones kept
            super().on_epoch_end(epoch, logs)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        if self._loaded is not None:  # Keras resets its progress here: put the backed-up one back
            values, weights = self._loaded
            self.best, self.best_epoch, self.wait = values["best"], values["best_epoch"], values["wait"]
            self.best_weights = weights

    def state(self) -> tuple[dict, list | None]:
        """The progress so far, as (JSON-ready values, best weights or None)."""
        best = None if self.best is None else float(self.best)
        return {"best": best, "best_epoch": int(self.best_epoch), "wait": int(self.wait)}, self.best_weights

    def load_state(self, state: tuple[dict, list | None] | None) -> None:
        """Continue from `state()` of an interrupted run: applied when training begins (None: start afresh)."""
        self._loaded = state


@contextlib.contextmanager
def ema_weights_in(model: keras.Model):
    """Within the block, `model`'s trainable weights hold its optimizer's moving average (`use_ema=True`).

    The weights it had come back at the end, bit for bit. Nothing changes when the
    optimizer keeps no average (or has not built it yet).
    """
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    averages = getattr(optimizer, "_model_variables_moving_average", None)
    if not averages:
        yield
        return
    pairs = [(v, a) for v, a in zip(optimizer._trainable_variables, averages) if a is not None]
    kept = [keras.ops.convert_to_numpy(v) for v, _ in pairs]
    for variable, average in pairs:
        variable.assign(average)
    try:
        yield
    finally:
        for (variable, _), value in zip(pairs, kept):
            variable.assign(value)
