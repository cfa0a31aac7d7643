"""Fast head training: run a frozen base once, then train the head on its outputs.

With the base wholly frozen and nothing random before the head, every epoch
would compute the same base outputs again. Computing them once makes head-only
stages cost one pass of the base instead of one per epoch. The cache holds
`examples x feature size x 4` bytes: in memory up to `MEMORY_LIMIT_BYTES`,
past that in a tf.data cache file beside the run.

Example:

>>> from transferkit.feature_cache import can_cache
>>> can_cache(features_model)                                   # doctest: +SKIP
True
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import keras
import numpy as np

from transferkit.freezing import all_layers

MEMORY_LIMIT_BYTES = 1 << 30
_STOCHASTIC = ("Dropout", "Noise", "Random", "RReLU")


def can_cache(features_model: keras.Model) -> bool:
    """True when the inputs-to-features path is frozen and deterministic in training mode."""
    return not features_model.trainable_weights and not any(
        any(word in type(layer).__name__ for word in _STOCHASTIC) for layer in all_layers(features_model))


def compute_features(features_model: keras.Model, x: np.ndarray, batch_size: int,
                     limit_bytes: int = MEMORY_LIMIT_BYTES):
    """The base's outputs for `x`, as an array, or as an unbatched cached tf.data.Dataset past `limit_bytes`."""
    import tensorflow as tf

    from transferkit.data import pipeline

    size = len(x) * math.prod(features_model.output.shape[1:]) * 4
    if size <= limit_bytes:
        return features_model.predict(pipeline(x, batch_size=batch_size), verbose=0)
    cache = Path(tempfile.mkdtemp(prefix="transferkit-features-")) / "features"
    ds = (tf.data.Dataset.from_tensor_slices(x).batch(batch_size)
          .map(lambda b: features_model(b, training=False)).unbatch().cache(str(cache)))
    for _ in ds:  # one pass fills the cache file
        pass
    return ds
