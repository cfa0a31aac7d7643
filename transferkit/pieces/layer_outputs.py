"""The layers a health probe watches, the activation each applies, and their outputs during one call.

Example:

>>> import keras
>>> from transferkit.pieces.layer_outputs import activation_name, leaves
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2, activation="tanh", name="d")])
>>> [(path, activation_name(layer)) for path, layer in leaves(model)]
[('d', 'tanh')]
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import keras

from transferkit.pieces.layers import RReLU

ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
                     keras.layers.PReLU, keras.layers.Softmax, RReLU)
NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                        keras.layers.GroupNormalization, keras.layers.Normalization)


def leaves(model: keras.Layer, prefix: str = "") -> Iterator[tuple[str, keras.Layer]]:
    """(path, layer) for each layer that is not a model, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from leaves(layer, f"{prefix}{layer.name}/")
        else:
            yield f"{prefix}{layer.name}", layer


def is_weighted(layer: keras.Layer) -> bool:
    """Whether `layer` has weights and is neither an activation nor a normalization layer."""
    return bool(layer.weights) and not isinstance(layer, ACTIVATION_LAYERS + NORMALIZATION_LAYERS)


def activation_name(layer: keras.Layer) -> str | None:
    """The nonlinearity a layer applies to its output, by name, or `None` for none."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope:
            return "leaky_relu"
        return "relu6" if layer.max_value == 6 else "relu"
    fixed = {keras.layers.LeakyReLU: "leaky_relu", keras.layers.ELU: "elu", keras.layers.PReLU: "prelu",
             keras.layers.Softmax: "softmax", RReLU: "rrelu"}
    for cls, name in fixed.items():
        if isinstance(layer, cls):
            return name
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return None if name in (None, "linear") else name


@contextlib.contextmanager
def recording(layers: list[tuple[str, keras.Layer]], watched: dict[int, str]) -> Iterator[list]:
    """Record (path, output) of each call of a `(path, layer)` whose id is in `watched`, in call order.

    The layers are restored afterwards, whatever happens.
    """
    outputs: list[tuple[str, Any]] = []
    wrapped = []

    def wrap(layer, path):
        original = layer.call

        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            outputs.append((path, out))
            return out

        layer.__dict__["call"] = call  # past Keras's attribute tracking, removed in `finally`
        wrapped.append(layer)

    try:
        for path, layer in layers:
            if id(layer) in watched:
                wrap(layer, path)
        yield outputs
    finally:
        for layer in wrapped:
            layer.__dict__.pop("call", None)
