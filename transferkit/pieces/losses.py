"""Cross-entropy with label smoothing for integer class labels; a classifier's loss and metric.

Keras's `SparseCategoricalCrossentropy` has no `label_smoothing` (only the
one-hot `CategoricalCrossentropy` has); this loss takes class indices, makes
them one-hot inside the loss and smooths them as Szegedy et al. (2016, "Rethinking
the Inception Architecture", section 7) and Keras do: a target of
`1 - e + e / K` for the true class and `e / K` for each of the others.

Example:

>>> import numpy as np
>>> loss = SparseCategoricalCrossentropyWithSmoothing(label_smoothing=0.1)
>>> round(float(loss(np.array([0]), np.array([[0.5, 0.25, 0.25]]))), 4)
0.7394

`loss_and_metric` picks what a classifier compiles with, for class indices or
for probabilities (soft or mixed targets), smoothed or not.
"""

from __future__ import annotations

from typing import Any

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="transferkit")
class SparseCategoricalCrossentropyWithSmoothing(keras.losses.Loss):
    """Cross-entropy of probabilities against integer labels smoothed by `label_smoothing`.

    Args:
        label_smoothing: Float in [0, 1). The probability mass `e` spread evenly
            over the `K` classes. Defaults to `0.0` (plain cross-entropy).
        name: String. Defaults to `"sparse_categorical_crossentropy_with_smoothing"`.
        **kwargs: `reduction`, `dtype` as for any Keras loss.

    Shapes: `y_true` (batch,) or (batch, 1) class indices; `y_pred` (batch, K) probabilities.

    Raises:
        ValueError: `label_smoothing` outside [0, 1).
    """

    def __init__(self, label_smoothing: float = 0.0, name: str = "sparse_categorical_crossentropy_with_smoothing",
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1). Received: label_smoothing={label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        one_hot = ops.one_hot(ops.cast(ops.reshape(y_true, (-1,)), "int32"), classes, dtype=y_pred.dtype)
        return keras.losses.categorical_crossentropy(one_hot, y_pred, label_smoothing=self.label_smoothing)

    def get_config(self) -> dict:
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def loss_and_metric(soft: bool, label_smoothing: float = 0.0) -> tuple[Any, list]:
    """Cross-entropy on class indices, or on probabilities, smoothed by `label_smoothing`; the metric: `accuracy`.

    Example:

    >>> loss_and_metric(False)
    ('sparse_categorical_crossentropy', ['accuracy'])
    """
    if soft:
        loss = (keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing) if label_smoothing
                else "categorical_crossentropy")
        return loss, [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if label_smoothing:
        return SparseCategoricalCrossentropyWithSmoothing(label_smoothing), ["accuracy"]
    return "sparse_categorical_crossentropy", ["accuracy"]
