"""Callbacks that guard a training run: divergence stop, resumable early stopping, EMA weights.

`StopOnDivergence` ends a run that diverged with a clear error instead of
letting it "succeed"; `ResumableEarlyStopping` is Keras's `EarlyStopping`
whose progress a backup can keep; `ema_weights_in` swaps an optimizer's
moving-average weights in for validation. (`OneCycleMomentum` is in
`transferkit.pieces.momentum`.)

Example:

>>> import keras
>>> from transferkit.pieces.callbacks import StopOnDivergence
>>> callbacks = [StopOnDivergence(stage="head")]  # model.fit(..., callbacks=callbacks)
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Sequence

import keras

from transferkit.errors import SettingsError, TransferkitError


def count_nonfinite(tensors: Sequence) -> int:
    """How many entries of `tensors` (variables or tensors) are NaN or infinite, counted where they are.

    On JAX one compiled function for the whole list (eager ops would compile
    four small programs for every distinct shape). On TensorFlow, eager ops
    and one read back: the sum of every entry, which is NaN or infinite
    whenever an entry is; only then are the entries counted (the sum of
    finite entries may also overflow: the count then says 0).
    """
    if keras.backend.backend() == "jax":
        return int(_jax_counter()([getattr(t, "value", t) for t in tensors]))
    ops, tensors = keras.ops, list(tensors)
    if not tensors or math.isfinite(float(ops.convert_to_numpy(
            ops.sum(ops.stack([ops.sum(ops.cast(t, "float32")) for t in tensors]))))):
        return 0
    return sum(int(ops.convert_to_numpy(ops.sum(ops.cast(ops.logical_not(ops.isfinite(t)), "int32"))))
               for t in tensors)


@functools.cache
def _jax_counter() -> Callable:
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda values: sum(jnp.sum(~jnp.isfinite(v), dtype="int32") for v in values))


class StopOnDivergence(keras.callbacks.Callback):
    """End training with a clear error when it diverges, instead of letting it "succeed".

    Diverged means: a non-finite loss after any batch; at an epoch's end, a
    non-finite weight, or a training loss above `growth` times the loss of the
    first batch (the loss of the weights training started from), or times
    `floor` when that is larger. Unlike
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
        floor: Float. The bound is at least `growth * floor`. For a classifier,
            the cross-entropy of a uniform guess, `ln(classes)`: a stage that
            starts from a loss already near 0 (0.28 on 13 examples) rises
            past ten times it at its peak rate and comes back, while a
            diverging one passes ten times a guess's loss. Defaults to `0.0`.
        learning_rate: Float or None. The stage's (peak) rate, for the message.
            Defaults to `None`.

    Raises:
        TransferkitError: from `fit`, when training diverges.
    """

    # where Keras dispatches batch hooks to a worker thread (JAX; not TensorFlow, whose backend Keras
    # marks not thread-safe) the error comes at a later batch or at the epoch's end, before any
    # epoch-end callback (such as a backup) runs
    async_safe = True

    def __init__(self, stage: str = "training", growth: float | None = 10.0, learning_rate: float | None = None,
                 floor: float = 0.0):
        super().__init__()
        if growth is not None and not growth > 1:
            raise SettingsError(f"growth must be a number > 1 or None. Received: growth={growth!r}")
        self.stage, self.growth, self.learning_rate, self.floor = stage, growth, learning_rate, float(floor)
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
        broken = count_nonfinite(self.model.weights)  # where the weights are: no copy of the model every epoch
        if broken:
            self._fail(f"{broken} weights became NaN or infinite", "its end")
        loss = (logs or {}).get("loss")
        if (self.growth is not None and loss is not None and self.first_loss is not None
                and float(loss) > self.growth * max(self.first_loss, self.floor, 1e-12)):
            reference = (f"its first value ({self.first_loss:.4g})" if self.first_loss >= self.floor
                         else f"a uniform guess's ({self.floor:.4g})")
            self._fail(f"the loss grew to {float(loss):.4g}, over {self.growth:g} times {reference}", "its end")

    def _fail(self, what: str, where: str) -> None:

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
        self._last_epoch: int | None = None  # the last epoch this fit trained

    def on_epoch_end(self, epoch, logs=None):
        self._last_epoch = epoch
        if not self.ema:
            return super().on_epoch_end(epoch, logs)
        with ema_weights_in(self.model):  # the weights judged (validation swaps them in) are the ones kept
            super().on_epoch_end(epoch, logs)

    def on_train_end(self, logs=None):
        if self.ema or self.best_weights is None or self.best_epoch != self._last_epoch:
            return super().on_train_end(logs)
        # the best epoch is the last one: the model holds its weights already, nothing to put back
        restore, self.restore_best_weights = self.restore_best_weights, False
        try:
            super().on_train_end(logs)
        finally:
            self.restore_best_weights = restore

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._last_epoch = None
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
