"""Layers that Keras lacks: Monte Carlo dropout and the randomized leaky ReLU.

`MCDropout` and `MCAlphaDropout` stay on at inference so that averaging many
predictions estimates the model's uncertainty (Gal & Ghahramani, 2016). They
force only their own `training` flag: a BatchNormalization elsewhere in the
model still uses its moving statistics when the model is called with
`training=False`.

Keras 3 already has mish, gelu, swish/silu, leaky_relu, elu and selu in
`keras.activations` (and `keras.layers.PReLU`), so they are not repeated here.
"""

from __future__ import annotations

import keras
from keras import ops


def _check_rate(rate: float) -> None:
    if not 0 <= rate < 1:
        raise ValueError(
            "Invalid value received for argument `rate`. Expected a float in "
            f"[0, 1) (the fraction of units to drop). Received: rate={rate}"
        )


class _AlwaysOn:
    """Mixin for a dropout layer: check `rate`, and drop whatever `training` says."""

    def __init__(self, rate: float, noise_shape=None, seed: int | None = None, **kwargs):
        _check_rate(rate)
        super().__init__(rate, noise_shape=noise_shape, seed=seed, **kwargs)

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


@keras.saving.register_keras_serializable(package="transferkit")
class MCDropout(_AlwaysOn, keras.layers.Dropout):
    """Dropout that stays on at inference (Monte Carlo dropout).

    Units are dropped with probability `rate` and the kept ones scaled by
    `1 / (1 - rate)` on every call, whatever `training` says; nothing else in
    the model is switched to training mode.

    Example:

    >>> import numpy as np
    >>> layer = MCDropout(0.5, seed=42)
    >>> x = np.ones((1, 8), "float32")
    >>> a, b = layer(x, training=False), layer(x, training=False)
    >>> bool(np.any(np.asarray(a) != np.asarray(b)))
    True

    Args:
        rate: Float in [0, 1). Fraction of the input units to drop.
        noise_shape: Tuple of ints (or `None` entries) or `None`. Shape of the
            binary dropout mask, e.g. `(batch_size, 1, features)` to drop the
            same features at every timestep. Defaults to `None` (the input
            shape).
        seed: Int or `None`. Seed of the random stream; a reloaded model with
            the same seed draws the same masks. Defaults to `None`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Raises:
        ValueError: if `rate` is not in [0, 1).
    """


@keras.saving.register_keras_serializable(package="transferkit")
class MCAlphaDropout(_AlwaysOn, keras.layers.AlphaDropout):
    """Alpha dropout that stays on at inference, for self-normalizing nets.

    Dropped units are set to `alpha' = -scale * alpha` (SELU's negative
    saturation value), then `y = a * x + b` with
    `a = ((1 - rate) * (1 + rate * alpha'**2)) ** -0.5` and
    `b = -a * alpha' * rate`, which keeps a standardized input's mean 0 and
    variance 1 (Klambauer et al., 2017). The math is Keras's `AlphaDropout`;
    only the `training` flag is forced on.

    Example:

    >>> import numpy as np
    >>> layer = MCAlphaDropout(0.1, seed=42)
    >>> y = layer(np.random.randn(1000, 10).astype("float32"), training=False)
    >>> abs(float(np.asarray(y).mean())) < 0.1
    True

    Args:
        rate: Float in [0, 1). Fraction of the input units to drop.
        noise_shape: Tuple of ints (or `None` entries) or `None`. Shape of the
            binary dropout mask. Defaults to `None` (the input shape).
        seed: Int or `None`. Seed of the random stream. Defaults to `None`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Raises:
        ValueError: if `rate` is not in [0, 1).
    """


@keras.saving.register_keras_serializable(package="transferkit")
class RReLU(keras.layers.Layer):
    """Randomized leaky ReLU (Xu et al., 2015).

    `f(x) = x` for `x >= 0` and `slope * x` otherwise. In training each
    element's slope is drawn uniformly from `[lower, upper]`; at inference the
    slope is the mean, `(lower + upper) / 2`.

    Example:

    >>> import numpy as np
    >>> layer = RReLU(lower=0.1, upper=0.3)
    >>> np.asarray(layer(np.array([[-1.0, 2.0]], "float32"), training=False))
    array([[-0.2,  2. ]], dtype=float32)

    Args:
        lower: Float >= 0. Smallest negative slope. Defaults to `1/8`.
        upper: Float >= `lower`. Largest negative slope. Defaults to `1/3`.
        seed: Int or `None`. Seed of the slopes drawn in training. Defaults
            to `None`.
        **kwargs: Base layer keyword arguments, such as `name` and `dtype`.

    Raises:
        ValueError: if not `0 <= lower <= upper`.
    """

    def __init__(self, lower: float = 1 / 8, upper: float = 1 / 3, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= lower <= upper:
            raise ValueError(
                "Invalid values received for arguments `lower` and `upper`. "
                f"Expected 0 <= lower <= upper. Received: lower={lower}, upper={upper}"
            )
        self.lower = lower
        self.upper = upper
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True
        self._build_at_init()

    def call(self, inputs, training=None):
        if training:
            slope = keras.random.uniform(ops.shape(inputs), minval=self.lower, maxval=self.upper,
                                         dtype=self.compute_dtype, seed=self.seed_generator)
        else:
            slope = (self.lower + self.upper) / 2
        return ops.where(inputs >= 0, inputs, inputs * slope)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = {"lower": self.lower, "upper": self.upper, "seed": self.seed}
        return {**super().get_config(), **config}
