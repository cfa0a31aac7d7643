"""Learning-rate schedules: 1cycle (fastai's cosine, the chapter's linear) and named decays.

Every schedule is a pure function of the optimizer step written with
`keras.ops`, so it runs on any backend, saves with the model and resumes
exactly (the reloaded optimizer's `iterations` gives the same rate).

`make_schedule` and `schedule_callbacks` are the one entry point for the CLI
and `finetune`: both take the schedule's name from `SCHEDULES` and the same
`**options`, the first returns what goes into the optimizer (a float or a
schedule), the second the callbacks that schedule needs.

Example:

>>> from transferkit.pieces.schedules import make_schedule, schedule_callbacks
>>> lr = make_schedule("onecycle", 0.01, total_steps=1000, pct_start=0.3)
>>> round(float(lr(300)), 6)
0.01
>>> [type(c).__name__ for c in schedule_callbacks("onecycle", lr)]
['OneCycleMomentum']
"""

from __future__ import annotations

import math
from typing import Any

import keras
from keras import ops

from transferkit.errors import SettingsError
from transferkit.recipe import SCHEDULES
SHAPES = ("cosine", "linear")

# schedule name -> the options it accepts (for make_schedule and schedule_callbacks alike)
SCHEDULE_OPTIONS = {
    "onecycle": ("div", "div_final", "pct_start", "shape", "max_momentum", "min_momentum"),
    "constant": (),
    "power": ("steps_per_decay", "power"),
    "exponential": ("steps_per_decay",),
    "piecewise": ("boundaries", "values"),
    "plateau": ("monitor", "factor", "patience", "min_lr"),
}


def _interpolate(step, knots: list[float], values: list[float], shape: str):
    """Piecewise curve through `(knots[i], values[i])`, cosine or linear between knots, flat outside."""
    step = ops.cast(step, "float32")
    out = ops.full_like(step, values[0])
    for k0, k1, v0, v1 in zip(knots, knots[1:], values, values[1:]):
        pos = ops.clip((step - k0) / (k1 - k0 if k1 > k0 else 1.0), 0.0, 1.0)  # an empty phase is overwritten by the next
        if shape == "cosine":
            # fastai's sched_cos, v0 + (1 - cos(pi * pos)) / 2 * (v1 - v0), written as
            # cos^2 / sin^2 weights so float32 keeps its precision near the ends
            w0, w1 = ops.square(ops.cos(math.pi / 2 * pos)), ops.square(ops.sin(math.pi / 2 * pos))
        else:
            w0, w1 = 1.0 - pos, pos
        out = ops.where(step >= k0, v0 * w0 + v1 * w1, out)
    return ops.where(step >= knots[-1], values[-1], out)


def _knots(total_steps: int, pct_start: float, shape: str) -> list[float]:
    """Where the 1cycle phases change: fastai's 2 cosine phases, or the chapter's 3 linear ones."""
    if shape == "cosine":
        return [0.0, pct_start * total_steps, float(total_steps)]
    half = (total_steps - (total_steps // 10 + 1)) // 2
    return [0.0, float(half), float(2 * half), float(total_steps)]


def one_cycle_momentum(step, total_steps: int, pct_start: float = 0.25, max_momentum: float = 0.95,
                       min_momentum: float = 0.85, shape: str = "cosine"):
    """Momentum of the 1cycle policy at `step`: the learning-rate curve mirrored.

    `cosine` (fastai): `max_momentum` -> `min_momentum` at `pct_start` of the
    steps -> `max_momentum` at the end. `linear` (the chapter): down over the
    first half cycle, back up over the second, then flat at `max_momentum`
    for the last ~10% of steps (`pct_start` is ignored, as for the rate).

    Example:

    >>> round(float(one_cycle_momentum(250, total_steps=1000)), 6)
    0.85

    Returns:
        A float32 scalar tensor.
    """
    knots = _knots(total_steps, pct_start, shape)
    values = [max_momentum, min_momentum, max_momentum, max_momentum][: len(knots)]
    return _interpolate(step, knots, values, shape)


@keras.saving.register_keras_serializable(package="transferkit")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """The 1cycle learning-rate policy (Smith 2018) as a pure function of the step.

    `shape="cosine"` is fastai's `fit_one_cycle`: cosine from `max_lr / div`
    up to `max_lr` over the first `pct_start` of the steps, then cosine down
    to `max_lr / div_final`. `shape="linear"` is the chapter's 1cycle
    (Géron): linear from `max_lr / 10` up to `max_lr` over the first half
    cycle, back down to `max_lr / 10` over the second, then down to
    `max_lr / 10_000` over the last `total_steps // 10 + 1` steps; `div`,
    `div_final` and `pct_start` are ignored by that shape (they are still
    validated and saved). After `total_steps` the final rate is held.

    Example:

    >>> lr = OneCycle(total_steps=10750, max_lr=0.1, shape="linear")
    >>> [round(float(lr(s)), 6) for s in (0, 4837, 9674)]
    [0.01, 0.1, 0.01]

    Args:
        total_steps: Int. Optimizer steps in the whole cycle (epochs * steps per epoch).
        max_lr: Float. Peak learning rate.
        div: Float. The cosine cycle starts at `max_lr / div`. Defaults to `25.0`.
        div_final: Float. The cosine cycle ends at `max_lr / div_final`. Defaults to `1e5`.
        pct_start: Float. Fraction of the steps spent warming up (cosine). Defaults to `0.25`.
        shape: String. `"cosine"` (fastai) or `"linear"` (the chapter). Defaults to `"cosine"`.

    Raises:
        SettingsError: (a ValueError) when an argument is out of range.
    """

    def __init__(self, total_steps: int, max_lr: float, div: float = 25.0, div_final: float = 1e5,
                 pct_start: float = 0.25, shape: str = "cosine", name: str | None = None):
        super().__init__()
        if not isinstance(total_steps, int) or isinstance(total_steps, bool) or total_steps < 1:
            raise SettingsError(f"total_steps must be an integer >= 1. Received: total_steps={total_steps!r}")
        for arg, value in (("max_lr", max_lr), ("div", div), ("div_final", div_final)):
            if not value > 0:
                raise SettingsError(f"{arg} must be > 0. Received: {arg}={value!r}")
        if not 0 < pct_start < 1:
            raise SettingsError(f"pct_start must be in (0, 1). Received: pct_start={pct_start!r}")
        if shape not in SHAPES:
            raise SettingsError(f"shape must be one of {SHAPES}. Received: shape={shape!r}")
        self.total_steps = total_steps
        self.max_lr = float(max_lr)
        self.div = float(div)
        self.div_final = float(div_final)
        self.pct_start = float(pct_start)
        self.shape = shape
        self.name = name

    def _values(self) -> list[float]:
        if self.shape == "cosine":
            return [self.max_lr / self.div, self.max_lr, self.max_lr / self.div_final]
        start = self.max_lr / 10
        return [start, self.max_lr, start, start / 1000]

    def __call__(self, step):
        return _interpolate(step, _knots(self.total_steps, self.pct_start, self.shape), self._values(), self.shape)

    def momentum(self, step, max_momentum: float = 0.95, min_momentum: float = 0.85):
        """The momentum that goes with this cycle at `step` (see `one_cycle_momentum`)."""
        return one_cycle_momentum(step, self.total_steps, self.pct_start, max_momentum, min_momentum, self.shape)

    def get_config(self) -> dict[str, Any]:
        return {"total_steps": self.total_steps, "max_lr": self.max_lr, "div": self.div,
                "div_final": self.div_final, "pct_start": self.pct_start, "shape": self.shape, "name": self.name}


@keras.saving.register_keras_serializable(package="transferkit")
class PowerDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Power scheduling: `initial_learning_rate / (1 + step / decay_steps) ** power`.

    Keras' `InverseTimeDecay` is the `power=1` case only.

    Example:

    >>> round(float(PowerDecay(0.01, decay_steps=100, power=2)(100)), 6)
    0.0025

    Args:
        initial_learning_rate: Float. Rate at step 0.
        decay_steps: Int. After `decay_steps` the rate is `initial / 2 ** power`.
        power: Float. The exponent `c`. Defaults to `1.0`.
    """

    def __init__(self, initial_learning_rate: float, decay_steps: int, power: float = 1.0, name: str | None = None):
        super().__init__()
        if not initial_learning_rate > 0:
            raise SettingsError(f"initial_learning_rate must be > 0. Received: initial_learning_rate={initial_learning_rate!r}")
        if not decay_steps > 0:
            raise SettingsError(f"decay_steps must be > 0. Received: decay_steps={decay_steps!r}")
        if not power > 0:
            raise SettingsError(f"power must be > 0. Received: power={power!r}")
        self.initial_learning_rate = float(initial_learning_rate)
        self.decay_steps = decay_steps
        self.power = float(power)
        self.name = name

    def __call__(self, step):
        step = ops.cast(step, "float32")
        return self.initial_learning_rate / ops.power(1.0 + step / self.decay_steps, self.power)

    def get_config(self) -> dict[str, Any]:
        return {"initial_learning_rate": self.initial_learning_rate, "decay_steps": self.decay_steps,
                "power": self.power, "name": self.name}


def power_schedule(initial_lr: float, steps_per_decay: int, power: float = 1.0) -> PowerDecay:
    """The chapter's power scheduling: `lr0 / (1 + step / s) ** c`."""
    return PowerDecay(initial_lr, steps_per_decay, power)


def exponential_schedule(initial_lr: float, steps_per_decay: int) -> keras.optimizers.schedules.ExponentialDecay:
    """The chapter's exponential scheduling: `lr0 * 0.1 ** (step / s)` (10x smaller every `s` steps)."""
    return keras.optimizers.schedules.ExponentialDecay(initial_lr, decay_steps=steps_per_decay, decay_rate=0.1)


def piecewise_schedule(boundaries: list[int], values: list[float]) -> keras.optimizers.schedules.PiecewiseConstantDecay:
    """`values[i]` until step `boundaries[i]`, then the next value (one more value than boundaries)."""
    return keras.optimizers.schedules.PiecewiseConstantDecay(list(boundaries), list(values))


def _check_options(name: str, options: dict) -> None:
    if name not in SCHEDULES:
        raise SettingsError(f"schedule must be one of {', '.join(SCHEDULES)}. Received: schedule={name!r}")
    unknown = sorted(set(options) - set(SCHEDULE_OPTIONS[name]))
    if unknown:
        allowed = ", ".join(SCHEDULE_OPTIONS[name]) or "none"
        raise SettingsError(f"Schedule {name!r} takes the options {allowed}. Received: {', '.join(unknown)}")


def make_schedule(name: str, learning_rate: float, total_steps: int, **options) -> float | keras.optimizers.schedules.LearningRateSchedule:
    """What to pass as the optimizer's `learning_rate` for schedule `name`.

    `constant` and `plateau` return `learning_rate` as a float (plateau
    lowers it from a callback, see `schedule_callbacks`); the others return
    a schedule over `total_steps`. `learning_rate` is the peak rate for
    `onecycle` and the initial rate otherwise. Unset decay options make the
    rate end near `learning_rate / 10` (power, exponential) or step down
    10x at 1/2 and 3/4 of the run (piecewise).

    Example:

    >>> make_schedule("constant", 0.01, total_steps=100)
    0.01

    Args:
        name: String. One of `SCHEDULES`.
        learning_rate: Float. Peak (onecycle) or initial learning rate.
        total_steps: Int. Optimizer steps in the whole run.
        **options: The options `SCHEDULE_OPTIONS[name]` lists (the callback
            options are accepted and ignored here).

    Raises:
        SettingsError: (a ValueError) for an unknown name or option, or a value out of range.
    """
    _check_options(name, options)
    if not learning_rate > 0:
        raise SettingsError(f"learning_rate must be > 0. Received: learning_rate={learning_rate!r}")
    learning_rate = float(learning_rate)
    if name in ("constant", "plateau"):
        return learning_rate
    if not isinstance(total_steps, int) or total_steps < 1:
        raise SettingsError(f"total_steps must be an integer >= 1. Received: total_steps={total_steps!r}")
    if name == "onecycle":
        own = {k: v for k, v in options.items() if k not in ("max_momentum", "min_momentum")}
        return OneCycle(total_steps, learning_rate, **own)
    if name == "power":
        power = options.get("power", 1.0)
        if not power > 0:
            raise SettingsError(f"power must be > 0. Received: power={power!r}")
        # lr(total_steps) = learning_rate / 10 unless steps_per_decay is given
        default = max(1, round(total_steps / (10 ** (1 / power) - 1)))
        return power_schedule(learning_rate, options.get("steps_per_decay", default), power)
    if name == "exponential":
        return exponential_schedule(learning_rate, options.get("steps_per_decay", total_steps))
    boundaries = options.get("boundaries", [max(1, total_steps // 2), max(2, 3 * total_steps // 4)])
    values = options.get("values", [learning_rate / 10**i for i in range(len(boundaries) + 1)])
    if len(values) != len(boundaries) + 1:
        raise SettingsError(f"piecewise needs one more value than boundaries. "
                            f"Received: boundaries={boundaries}, values={values}")
    return piecewise_schedule(boundaries, values)


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
    _check_options(name, options)
    if name == "onecycle":
        from transferkit.pieces.callbacks import OneCycleMomentum

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
