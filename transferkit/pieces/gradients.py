"""Gradients on the TensorFlow and JAX backends, through one function.

Keras 3 has no backend-neutral gradient call: TensorFlow takes a `GradientTape`,
JAX `jax.value_and_grad`. The health probes need one; the pipelines may share it.

Example:

>>> import keras
>>> from transferkit.pieces.gradients import value_and_grads
>>> w = keras.ops.convert_to_tensor([1.0, 2.0])
>>> value, grads, aux = value_and_grads(lambda ws: (keras.ops.sum(ws[0] ** 2), None), [w])
>>> keras.ops.convert_to_numpy(grads[0]).tolist()
[2.0, 4.0]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import keras


def value_and_grads(fn: Callable[[list], tuple[Any, Any]], wrt: Sequence) -> tuple[Any, list, Any]:
    """`fn(wrt) -> (scalar, aux)`, and the scalar's gradients with respect to each tensor of `wrt`.

    Returns `(scalar, gradients, aux)`. A tensor the scalar does not depend on
    gets `None` on TensorFlow and zeros on JAX.
    """
    if keras.backend.backend() == "jax":
        import jax

        (value, aux), grads = jax.value_and_grad(fn, has_aux=True)(list(wrt))
        return value, list(grads), aux
    import tensorflow as tf

    wrt = [tf.convert_to_tensor(t) for t in wrt]
    with tf.GradientTape() as tape:
        tape.watch(wrt)
        value, aux = fn(wrt)
    return value, tape.gradient(value, wrt), aux
