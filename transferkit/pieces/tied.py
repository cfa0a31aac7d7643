"""A dense layer that reuses another Dense layer's kernel, transposed (tied weights).

A tied autoencoder's decoder layers are `DenseTranspose(encoder_dense)`: each
computes `activation(x @ W.T + b)` with the encoder's own kernel `W` (one
variable, trained from both sides) and a bias of its own. This halves the
weights and is the chapter's way to regularize a symmetric autoencoder.

Example:

>>> import keras, numpy as np
>>> dense = keras.layers.Dense(3)
>>> codes = dense(np.ones((2, 5), "float32"))
>>> tuple(DenseTranspose(dense)(codes).shape)
(2, 5)
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="transferkit")
class DenseTranspose(keras.layers.Layer):
    """`activation(x @ dense.kernel.T + bias)`: a Dense tied to `dense`'s kernel.

    The layer owns only its bias; `dense.kernel` is the same variable in both
    layers, so training either side updates the one kernel. Saved in a model
    together with `dense`, it reloads tied to the reloaded `dense` (Keras's
    shared-object scope recognizes the one layer in both places).

    Example:

    >>> import keras
    >>> inputs = keras.Input((64,))
    >>> dense = keras.layers.Dense(16, activation="selu")
    >>> outputs = DenseTranspose(dense)(dense(inputs))
    >>> keras.Model(inputs, outputs).count_params()   # 64*16 + 16 + 64
    1104

    Args:
        dense: `keras.layers.Dense`. The layer whose kernel is reused, transposed.
        activation: Activation name or callable. Defaults to `None` (linear).
        use_bias: Bool. Whether to add a bias of the layer's own. Defaults to `True`.
        **kwargs: Base layer keyword arguments, such as `name`.

    Raises:
        TypeError: if `dense` is not a `keras.layers.Dense`.
    """

    def __init__(self, dense: keras.layers.Dense, activation=None, use_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        if isinstance(dense, dict):  # from a config, outside a shared-object scope
            dense = keras.saving.deserialize_keras_object(dense)
        if not isinstance(dense, keras.layers.Dense):
            raise TypeError(f"DenseTranspose ties to a keras.layers.Dense. Received: dense={dense!r}")
        self.dense = dense
        self.activation = keras.activations.get(activation)
        self.use_bias = use_bias

    def build(self, input_shape):
        if not self.dense.built:
            raise ValueError(f"DenseTranspose needs its Dense built first (call it on inputs). "
                             f"Received: dense={self.dense.name!r}, not built")
        if input_shape[-1] != self.dense.units:
            raise ValueError(f"DenseTranspose of a Dense with {self.dense.units} units takes inputs of that size. "
                             f"Received: input_shape={input_shape}")
        self.bias = self.add_weight(name="bias", shape=(self.dense.kernel.shape[0],), initializer="zeros",
                                    trainable=True) if self.use_bias else None

    def call(self, inputs):
        x = ops.matmul(inputs, ops.transpose(self.dense.kernel))
        if self.bias is not None:
            x = ops.add(x, self.bias)
        return self.activation(x) if self.activation is not None else x

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], self.dense.kernel.shape[0])

    def get_config(self):
        return {**super().get_config(), "dense": keras.saving.serialize_keras_object(self.dense),
                "activation": keras.activations.serialize(self.activation), "use_bias": self.use_bias}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["dense"] = keras.saving.deserialize_keras_object(config["dense"])
        return cls(**config)
