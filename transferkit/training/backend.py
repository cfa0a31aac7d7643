"""The two things the pipelines need from the backend itself: a compiled forward pass and gradients.

Everything else is `keras.ops`. TensorFlow runs them as a `tf.function` and a
`GradientTape`; JAX as `jax.jit` over `stateless_call` and `jax.value_and_grad`.
The data stays `tf.data` on both (Keras on JAX takes tf.data datasets).

Example:

>>> import keras, numpy as np
>>> from transferkit.training.backend import forward
>>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
>>> forward(model)(np.ones((4, 3), "float32")).shape
(4, 2)
"""

from __future__ import annotations

import weakref
from collections.abc import Callable

import keras
import numpy as np

_FORWARDS: "weakref.WeakKeyDictionary[keras.Model, Callable]" = weakref.WeakKeyDictionary()


def name() -> str:
    """The Keras backend: `tensorflow` or `jax` (the others are not supported by the pipelines)."""
    return keras.backend.backend()


def forward(model: keras.Model) -> Callable[[np.ndarray], np.ndarray]:
    """`model(batch, training=False)` as numpy in, numpy out, compiled once per model for batches of any size.

    The compiled function reads the model's current weights at every call and
    does not keep the model alive.
    """
    fn = _FORWARDS.get(model)
    if fn is None:
        fn = _FORWARDS[model] = (_jax_forward if name() == "jax" else _tf_forward)(weakref.ref(model))
    return fn


def _tf_forward(model: "weakref.ref[keras.Model]") -> Callable:
    import tensorflow as tf

    inputs = model().inputs[0]
    spec = tf.TensorSpec((None, *inputs.shape[1:]), inputs.dtype)
    compiled = tf.function(lambda batch: model()(batch, training=False), input_signature=[spec])
    return lambda x: compiled(tf.cast(x, inputs.dtype)).numpy()


def _jax_forward(model: "weakref.ref[keras.Model]") -> Callable:
    import jax

    dtype = model().inputs[0].dtype

    @jax.jit
    def compiled(trainable, non_trainable, batch):
        return model().stateless_call(trainable, non_trainable, batch, training=False)[0]

    def run(x):
        m = model()
        values = ([v.value for v in m.trainable_variables], [v.value for v in m.non_trainable_variables])
        return np.asarray(compiled(*values, np.asarray(x, dtype)))

    return run


def jit_compile(xla: bool) -> bool | str:
    """`compile`'s `jit_compile` for `--jit-compile` (`xla`): on TensorFlow as given (False: a graph without XLA).

    On JAX a step is XLA-compiled or not compiled at all: False would run every
    op of every step eagerly (and compile each op on its own), several times
    slower; there it is Keras's `"auto"`, which compiles unless the model cannot be.
    """
    return xla or ("auto" if name() == "jax" else False)


def build_compiled(model: keras.Model, batches) -> None:
    """On JAX, build `model`'s compiled loss and metrics with a test step on the first of `batches` (unshuffled;
    or a function that makes them, called on JAX only).

    Otherwise JAX's `fit` builds them on a batch it draws from the training data
    itself: an extra pass that takes one reshuffle of a seeded `shuffle`, so every
    epoch would see the order TensorFlow's next epoch sees. TensorFlow needs nothing.
    """
    if name() != "jax":
        return
    x, y = next(iter(batches() if callable(batches) else batches))
    # one compiled test step (validation reuses it) rather than eager ops, each compiled on its own
    model.test_on_batch(np.asarray(x), np.asarray(y))
    model.reset_metrics()
