"""Optimizers by name, with the chapter's settings and gradient clipping.

Keras is imported inside `optimizer()`, so the CLI can read `OPTIMIZERS` for
a `click.Choice` without importing TensorFlow.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from transferkit.errors import SettingsError

if TYPE_CHECKING:
    import keras

# name -> (keras.optimizers class, settings)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "sgd": ("SGD", {}),
    "momentum": ("SGD", {"momentum": 0.9}),
    "nesterov": ("SGD", {"momentum": 0.9, "nesterov": True}),
    "adam": ("Adam", {"beta_1": 0.9, "beta_2": 0.999}),
    "adamw": ("AdamW", {"beta_1": 0.9, "beta_2": 0.999}),
    "nadam": ("Nadam", {"beta_1": 0.9, "beta_2": 0.999}),
    "rmsprop": ("RMSprop", {"rho": 0.9}),
}

OPTIMIZERS: tuple[str, ...] = tuple(PRESETS)


def optimizer(
    name: str = "nadam",
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = 1e-3,
    clipnorm: float | None = None,
    clipvalue: float | None = None,
    global_clipnorm: float | None = None,
    **kwargs: Any,
) -> keras.optimizers.Optimizer:
    """A Keras optimizer by name, with the chapter's settings.

    Example:

    >>> opt = optimizer("nesterov", learning_rate=0.01, clipnorm=1.0)
    >>> type(opt).__name__, opt.momentum, opt.nesterov, opt.clipnorm
    ('SGD', 0.9, True, 1.0)

    Args:
        name: String, one of `OPTIMIZERS`: `"sgd"`, `"momentum"` (SGD,
            momentum 0.9), `"nesterov"` (SGD, momentum 0.9, Nesterov),
            `"adam"`, `"adamw"`, `"nadam"` (beta_1 0.9, beta_2 0.999) or
            `"rmsprop"` (rho 0.9). Defaults to `"nadam"`.
        learning_rate: Float > 0 or a
            `keras.optimizers.schedules.LearningRateSchedule`. Defaults to
            `1e-3`.
        clipnorm: Float or `None`. Clip each gradient to this norm. Defaults
            to `None`.
        clipvalue: Float or `None`. Clip each gradient element to
            `[-clipvalue, clipvalue]`. Defaults to `None`.
        global_clipnorm: Float or `None`. Clip all gradients together to this
            global norm. Defaults to `None`.
        **kwargs: More arguments of the optimizer class; they override the
            preset (e.g. `momentum=0.95`).

    Returns:
        A `keras.optimizers.Optimizer`.

    Raises:
        SettingsError: (a `ValueError`) if `name` is unknown, `learning_rate`
            is not positive, or Keras refuses the arguments (more than one
            clipping argument), with Keras's message.
    """
    if name not in PRESETS:
        raise SettingsError(f"Unknown optimizer. Expected one of {', '.join(OPTIMIZERS)}. Received: name={name!r}")
    if isinstance(learning_rate, (int, float)) and not learning_rate > 0:
        raise SettingsError(f"Expected a positive learning rate or a schedule. Received: learning_rate={learning_rate}")
    import keras

    class_name, settings = PRESETS[name]
    try:
        return getattr(keras.optimizers, class_name)(
            learning_rate=learning_rate,
            clipnorm=clipnorm,
            clipvalue=clipvalue,
            global_clipnorm=global_clipnorm,
            **{**settings, **kwargs},
        )
    except ValueError as err:
        raise SettingsError(str(err)) from None


def make_optimizer(recipe: Any, learning_rate: Any, ema: float | None = None) -> keras.optimizers.Optimizer:
    """The recipe's optimizer (its `optimizer`, `clipnorm` and `clipvalue`) at `learning_rate` (a float or a schedule).

    `ema`: keep an exponential moving average of the weights with this decay
    (Keras's `use_ema=True, ema_momentum=ema`); `fit` ends with the average in the model.

    Raises:
        SettingsError: an unknown optimizer, a rate that is not positive, more than one clipping.
    """
    averaging = {"use_ema": True, "ema_momentum": ema} if ema else {}
    return optimizer(recipe.optimizer, learning_rate=learning_rate, clipnorm=recipe.clipnorm,
                     clipvalue=recipe.clipvalue, **averaging)
