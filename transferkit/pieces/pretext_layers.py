"""Layers of the pretraining models: masking-noise rescaling and the pair scores of the `pairs` task.

They live here, apart from `pretraining` and `pretext`, so that registering
them (see `transferkit.registration`) imports nothing but Keras.

Example:

>>> import numpy as np
>>> tuple(PairScores()([np.eye(3, dtype="float32"), np.eye(3, dtype="float32")]).shape)
(3, 3)
"""

from __future__ import annotations

import math

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="transferkit")
class _TrainingOnlyScale(keras.layers.Layer):
    """Multiply by `scale` while training only: undoes Dropout's rescaling, which makes it masking noise."""

    def __init__(self, scale: float, **kwargs):
        super().__init__(**kwargs)
        self.scale = float(scale)

    def call(self, inputs, training=None):
        return inputs * self.scale if training else inputs

    def get_config(self):
        return {**super().get_config(), "scale": self.scale}


@keras.saving.register_keras_serializable(package="transferkit")
class PairScores(keras.layers.Layer):
    """`(B, B)` logits `scale * cos(a_i, b_j) + bias` of every pair of rows of `a` and `b`.

    `scale` starts at `initial_scale` and is learned (as a logarithm), with the bias.

    Example:

    >>> import numpy as np
    >>> tuple(PairScores()([np.eye(3, dtype="float32"), np.eye(3, dtype="float32")]).shape)
    (3, 3)

    Args:
        initial_scale: Float. Starting inverse temperature. Defaults to `10.0`.
    """

    def __init__(self, initial_scale: float = 10.0, **kwargs):
        super().__init__(**kwargs)
        if not initial_scale > 0:
            raise ValueError(f"initial_scale must be positive. Received: initial_scale={initial_scale}")
        self.initial_scale = float(initial_scale)

    def build(self, input_shape):
        self.log_scale = self.add_weight(name="log_scale", shape=(),
                                         initializer=keras.initializers.Constant(math.log(self.initial_scale)))
        self.bias = self.add_weight(name="bias", shape=(), initializer="zeros")

    def call(self, inputs):
        a, b = (ops.normalize(v, axis=-1) for v in inputs)
        return ops.exp(self.log_scale) * ops.matmul(a, ops.transpose(b)) + self.bias

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[1][0])

    def get_config(self):
        return {**super().get_config(), "initial_scale": self.initial_scale}
