"""Fast head training: run a frozen base once, then train the head on its outputs.

With the base wholly frozen and nothing random before the head, every epoch
would compute the same base outputs again. Computing them once makes head-only
stages cost one pass of the base instead of one per epoch. The cache holds
`examples x feature size x 4` bytes: in memory up to `MEMORY_LIMIT_BYTES`,
past that in a tf.data cache file beside the run.

Example:

>>> from transferkit.finetuning.feature_cache import can_cache
>>> can_cache(features_model)                                   # doctest: +SKIP
True
"""

from __future__ import annotations

import math
import sys
import tempfile
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import keras
import numpy as np

from transferkit.training import backend
from transferkit.pieces.freezing import all_layers

MEMORY_LIMIT_BYTES = 1 << 30
# batches the base runs at once: TensorFlow keeps 2 CPU cores only ~60% busy on one MobileNetV2 batch
# (small depthwise ops); two in flight make the pass ~1.25x faster, with the same outputs bit for bit
IN_FLIGHT = 2
_STOCHASTIC = ("Dropout", "Noise", "Random", "RReLU", "Augment")


def can_cache(features_model: keras.Model) -> bool:
    """True when the inputs-to-features path is frozen and deterministic in training mode."""
    return not features_model.trainable_weights and not any(
        any(word in type(layer).__name__ for word in _STOCHASTIC) for layer in all_layers(features_model))


def compute_features(features_model: keras.Model, x, batch_size: int, limit_bytes: int = MEMORY_LIMIT_BYTES,
                     rows: np.ndarray | None = None, flat: bool = False):
    """The base's outputs for `x`, as an array, or as an unbatched cached tf.data.Dataset past `limit_bytes`.

    `flat`: the model's inputs instead of its outputs, each flattened to float32 (a `Flatten` on its
    input): the rows of a kNN graph on the inputs (`examples.propagate`), held as these `N x d` values
    alone. `rows`: the outputs for `x[rows]`, in memory, the rows read in ascending order (a tfds split
    streams once) and put back in the order asked.

    `x` is an array, or image files (`ImageFiles`), decoded batch by batch
    through `transferkit.data.pipelines.pipeline` while the base runs on the batches
    before (a progress bar past a few hundred images).
    The base runs batch by batch through one compiled function per model
    (`transferkit.training.backend.forward`: a `tf.function` or a `jax.jit`, compiled
    once for any batch size and kept for the model's next call, e.g. the
    validation inputs), not through `predict`: the same outputs, bit for bit,
    without predict's data adapter, callbacks and slower first call (about 2 s
    of a MobileNetV2 stage on 2 CPU cores). `IN_FLIGHT` batches run at once.
    """
    import tensorflow as tf

    from transferkit.data.pipelines import batches_of

    place = None if rows is None else np.argsort(rows, kind="stable")
    if place is not None:
        x = x[np.asarray(rows)[place]]
    if flat:
        inputs = features_model.inputs[0]
        flatten = keras.layers.Flatten(dtype="float32", name="flatten")  # float32 under a mixed precision policy
        features_model = keras.Model(inputs, flatten(inputs), name="flat_inputs")
    base, shape = backend.forward(features_model), tuple(features_model.output.shape[1:])
    desc = "inputs for the kNN graph" if flat else "base outputs"
    size = len(x) * math.prod(shape) * 4
    in_memory = size <= limit_bytes or place is not None
    batches = batches_of(x, batch_size, desc=desc if in_memory else None)  # read only as the base runs
    if in_memory:
        if not len(x):
            return np.zeros((0, *shape), "float32")
        out = None

        def run(i: int, batch) -> None:
            out[slice(i, i + len(batch)) if place is None else place[i:i + len(batch)]] = base(batch)

        with ThreadPoolExecutor(IN_FLIGHT) as pool:
            running = deque()
            for i, batch in zip(range(0, len(x), batch_size), batches):
                if out is None:  # compiles once, before the threads start
                    first = base(batch)
                    out = np.empty((len(x), *first.shape[1:]), first.dtype)
                    out[slice(0, len(first)) if place is None else place[:len(first)]] = first
                    continue
                running.append(pool.submit(run, i, batch))
                if len(running) > IN_FLIGHT:  # as many batches decoded ahead as run: memory stays flat
                    running.popleft().result()
            for job in running:
                job.result()
        return out
    cache = Path(tempfile.mkdtemp(prefix="transferkit-features-")) / "features"
    spec = tf.TensorSpec((None, *shape), features_model.output.dtype)
    ds = tf.data.Dataset.from_generator(lambda: (base(batch) for batch in batches),
                                        output_signature=spec).unbatch().cache(str(cache))
    for _ in ds:  # one pass fills the cache file
        pass
    return ds


FLAT_FEATURES = 1e-6  # the largest spread across examples of any feature, below which the head has nothing


def warn_if_constant(features: np.ndarray, description: str) -> bool:
    """Warn on stderr, once, when no feature of the base varies across the examples: the head can only guess.

    A backbone with random weights (`--weights none`) keeps BatchNorm's initial
    statistics, and a deep one can then output the same (near-zero) features for
    every input. Returns whether it warned.
    """
    spread = float(np.std(features.reshape(len(features), -1), axis=0).max()) if len(features) > 1 else 1.0
    if spread >= FLAT_FEATURES:
        return False
    print(f"warning: the features of {description} do not vary across the training examples (largest spread "
          f"{spread:.2g}): the head can only guess. Use pretrained weights (--weights imagenet or a weights file) "
          "or another base.", file=sys.stderr, flush=True)
    return True
