"""`lr_find`: the learning-rate range test (Smith 2015, fastai's `lr_find`).

Train on a few batches while the learning rate grows exponentially from
`start_lr` to `end_lr`, record the loss (smoothed with a bias-corrected moving
average), stop when it diverges, and suggest a rate. The model's weights, the
optimizer's variables (slots, step counter, learning rate) and its learning
rate schedule are put back afterwards, whatever happens.

Example:

>>> import numpy as np, keras
>>> from transferkit.pieces.lr_finder import lr_find
>>> model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
>>> model.compile(keras.optimizers.SGD(), "mse")
>>> x = np.random.randn(256, 4); y = x @ np.ones((4, 1))
>>> result = lr_find(model, (x, y), num_steps=50)         # doctest: +SKIP
>>> print(result)                                         # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import os
from pathlib import Path

import keras
import numpy as np

from transferkit.errors import SettingsError

# suggestion name -> how the summary and the plot label it
SUGGESTIONS = {"valley": "valley (suggestion)", "minimum": "minimum / 10", "steep": "steepest descent"}


def _valley(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `valley`: the longest decreasing run of the loss (not necessarily contiguous), halfway down it."""
    n = len(losses)
    max_start, max_end = 0, 0
    lds = [1] * n
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return float(lrs[max_start + int(sections) + int(sections / 2)])


def _minimum(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `minimum`: a tenth of the rate at the lowest loss."""
    return float(lrs[np.argmin(losses)]) / 10


def _steep(lrs: np.ndarray, losses: np.ndarray) -> float:
    """fastai's `steep`: the rate where the loss falls fastest against log(lr)."""
    grads = np.diff(losses) / np.diff(np.log(lrs))
    return float(lrs[np.argmin(grads)])


def _suggest(lrs: list[float], losses: list[float], num_steps: int) -> dict[str, float | None]:
    """The suggestions on fastai's window: skip the first tenth and the last 5 points, stop at a NaN."""
    lrs, losses = np.asarray(lrs), np.asarray(losses)
    window = slice(num_steps // 10, -5) if len(lrs) - num_steps // 10 - 5 >= 3 else slice(None)
    lrs, losses = lrs[window], losses[window]
    finite = np.isfinite(losses)
    end = len(losses) if finite.all() else int(np.argmin(finite))
    lrs, losses = lrs[:end], losses[:end]
    if len(lrs) < 2:
        return dict.fromkeys(SUGGESTIONS)
    return {"valley": _valley(lrs, losses), "minimum": _minimum(lrs, losses), "steep": _steep(lrs, losses)}


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise SettingsError(f"The folder for the plot does not exist; create it first. Received: plot={str(path)!r}")


@dataclasses.dataclass
class LRFindResult:
    """What `lr_find` saw: rates, losses (smoothed and raw), and suggested rates (None when too few points)."""

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    valley: float | None
    minimum: float | None
    steep: float | None
    stopped: str = "completed"

    @property
    def suggestion(self) -> float | None:
        """The rate to use: fastai's default, `valley`."""
        return self.valley

    def summary(self) -> str:
        lines = [f"LR range test: {len(self.lrs)} steps, lr {self.lrs[0]:.2e} to {self.lrs[-1]:.2e} ({self.stopped})"]
        for name, label in SUGGESTIONS.items():
            value = getattr(self, name)
            lines.append(f"  {label + ':':<21}{'n/a' if value is None else f'{value:.2e}'}")
        return "\n".join(lines)

    __str__ = summary

    def plot(self, path: str | os.PathLike) -> Path:
        """Write the loss against the rate (log x, last 5 points left out as fastai does) to PNG `path`."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        from transferkit.store.pictures import save_figure

        path = Path(path)
        _check_folder(path)
        lrs, losses = np.asarray(self.lrs), np.asarray(self.losses)
        keep = np.isfinite(losses)
        if keep.sum() > 10:
            keep[-5:] = False
        figure = Figure(figsize=(6, 4))
        FigureCanvasAgg(figure)
        ax = figure.add_subplot()
        ax.plot(lrs[keep], losses[keep])
        ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss (smoothed)")
        for name, label in SUGGESTIONS.items():
            value = getattr(self, name)
            if value is not None and keep.any():
                y = np.interp(np.log(value), np.log(lrs[keep]), losses[keep])
                ax.plot(value, y, "o", label=f"{label}: {value:.1e}")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best")
        figure.tight_layout()
        return save_figure(figure, path)


def _batches(data, batch_size: int):
    """An endless iterator of `(x, y, sample_weight)` batches from arrays (reshuffled each pass) or a Dataset."""
    if hasattr(data, "element_spec"):  # tf.data.Dataset: batches as they come, repeated
        return map(keras.utils.unpack_x_y_sample_weight, data.repeat())
    if not (isinstance(data, (tuple, list)) and len(data) == 2):
        raise SettingsError(f"data must be an (x, y) pair of arrays or a tf.data.Dataset of (x, y) batches. "
                            f"Received: data of type {type(data).__name__}")
    x, y = np.asarray(data[0]), np.asarray(data[1])
    if len(x) != len(y) or len(x) == 0:
        raise SettingsError(f"x and y must have the same, non-zero number of rows. Received: {len(x)} and {len(y)}")
    size = min(batch_size, len(x))

    def endless():
        rng = np.random.default_rng(0)
        while True:
            order = rng.permutation(len(x))
            for start in range(0, len(x) - size + 1, size):
                rows = order[start:start + size]
                yield x[rows], y[rows], None

    return endless()


class _VariableRate(keras.optimizers.schedules.LearningRateSchedule):
    """A schedule that returns a variable: lets the sweep set the rate of an optimizer built on a schedule."""

    def __init__(self, rate: keras.Variable):
        self.rate = rate

    def __call__(self, step):
        return self.rate


@contextlib.contextmanager
def _settable_learning_rate(model):
    """Yield a function that sets the optimizer's learning rate for the next train step."""
    optimizer = getattr(model.optimizer, "inner_optimizer", model.optimizer)
    if isinstance(optimizer.learning_rate, keras.Variable):  # a float rate is a variable the traced step reads
        yield optimizer.learning_rate.assign
        return
    original = optimizer._learning_rate  # a schedule: no public getter for the object itself
    rate = keras.Variable(0.0, dtype="float32", trainable=False)
    optimizer.learning_rate = _VariableRate(rate)
    model.make_train_function(force=True)
    try:
        yield rate.assign
    finally:
        optimizer.learning_rate = original
        model.make_train_function(force=True)


def _state_variables(model) -> list:
    """Everything a train step changes: weights, seed states, optimizer slots and step, metric states."""
    variables = {}
    for v in [*model.variables, *model.optimizer.variables, *model.metrics_variables]:
        variables.setdefault(id(v), v)
    return list(variables.values())


def _validate(start_lr, end_lr, num_steps, beta, stop_factor, batch_size) -> None:
    if not 0 < start_lr < end_lr:
        raise SettingsError(f"Expected 0 < start_lr < end_lr. Received: start_lr={start_lr}, end_lr={end_lr}")
    if not isinstance(num_steps, int) or num_steps < 10:
        raise SettingsError(f"num_steps must be an integer >= 10. Received: num_steps={num_steps!r}")
    if not 0 <= beta < 1:
        raise SettingsError(f"beta must be in [0, 1). Received: beta={beta}")
    if not stop_factor > 1:
        raise SettingsError(f"stop_factor must be > 1. Received: stop_factor={stop_factor}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise SettingsError(f"batch_size must be an integer >= 1. Received: batch_size={batch_size!r}")


def lr_find(model: keras.Model, data, start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100,
            beta: float = 0.98, stop_factor: float = 4.0, batch_size: int = 32,
            plot: str | os.PathLike | None = None) -> LRFindResult:
    """Run the learning-rate range test on a compiled model and suggest a rate.

    Step `i` trains one batch at `start_lr * (end_lr / start_lr) ** (i / num_steps)`.
    The loss is smoothed as fastai does (`avg = beta * avg + (1 - beta) * loss`,
    divided by `1 - beta ** (i + 1)`); the test stops early once the smoothed
    loss exceeds `stop_factor` times the best so far, or is NaN or infinite.
    Suggestions follow fastai, on its window (first tenth and last 5 points
    left out): `valley` (the default), `minimum` (a tenth of the rate at the
    lowest loss) and `steep` (steepest fall of the loss against log lr).

    Example:

    >>> result = lr_find(model, (x_train, y_train))         # doctest: +SKIP
    >>> model.optimizer.learning_rate = result.suggestion   # doctest: +SKIP

    Args:
        model: `keras.Model`, compiled (its optimizer and loss are used).
        data: `(x, y)` arrays (random batches of `batch_size`, reshuffled each
            pass) or a `tf.data.Dataset` of `(x, y)` batches (repeated).
        start_lr: Float. First rate. Defaults to `1e-7`.
        end_lr: Float. The rate the sweep heads to. Defaults to `10.0`.
        num_steps: Int. Batches in the full sweep, at least 10. Defaults to `100`.
        beta: Float. Smoothing of the loss. Defaults to `0.98`.
        stop_factor: Float. Stop when smoothed loss > `stop_factor` x best. Defaults to `4.0`.
        batch_size: Int. Rows per batch for array data. Defaults to `32`.
        plot: Path or None. Where to write the plot (PNG). Defaults to `None`.

    Returns:
        An `LRFindResult`.

    Raises:
        SettingsError: (a ValueError) for bad arguments, an uncompiled model,
            or a plot folder that does not exist (all before any training).
    """
    _validate(start_lr, end_lr, num_steps, beta, stop_factor, batch_size)
    if not getattr(model, "compiled", False) or model.optimizer is None:
        raise SettingsError("lr_find needs a compiled model: call model.compile(optimizer, loss) first. "
                            "Received: an uncompiled model")
    if plot is not None:
        _check_folder(Path(plot))
    batches = _batches(data, batch_size)
    first = next(batches, None)
    if first is None:
        raise SettingsError("data has no batches. Received: an empty dataset")
    if not model.built:
        model(first[0])
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)

    variables = _state_variables(model)
    saved = [np.array(keras.ops.convert_to_numpy(v.value)) for v in variables]
    factor = end_lr / start_lr
    lrs, raw, smoothed, stopped = [], [], [], "completed"
    try:
        with _settable_learning_rate(model) as set_lr:
            average, best = 0.0, math.inf
            for i, (x, y, sample_weight) in zip(range(num_steps), itertools.chain([first], batches)):
                lr = start_lr * factor ** (i / num_steps)
                set_lr(lr)
                loss = float(model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)["loss"])
                average = beta * average + (1 - beta) * loss
                smooth = average / (1 - beta ** (i + 1))
                lrs.append(lr)
                raw.append(loss)
                smoothed.append(smooth)
                if not math.isfinite(smooth):
                    stopped = "stopped: loss not finite"
                    break
                best = min(best, smooth)
                if smooth > stop_factor * best:
                    stopped = f"stopped: loss above {stop_factor:g}x best"
                    break
    finally:
        for v, value in zip(variables, saved):
            v.assign(value)

    result = LRFindResult(lrs, smoothed, raw, **_suggest(lrs, smoothed, num_steps), stopped=stopped)
    if plot is not None:
        result.plot(plot)
    return result
