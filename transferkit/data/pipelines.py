"""tf.data pipelines and batch-by-batch passes over a data set's inputs: arrays or image files alike.

`pipeline` is the one way into tf.data for every pass (training, validation,
prediction, the test), and `stage_batches` makes all of a training stage's
at once; `batches_of` gives numpy batches in order for passes
that run a model, flatten inputs or sum statistics batch by batch. `ImageFiles`
are decoded batch by batch, never all at once (`transferkit.data.image_files`).

Example:

>>> import numpy as np
>>> x = np.arange(12.0).reshape(6, 2)
>>> [b.shape for b in batches_of(x, 4)]
[(4, 2), (2, 2)]
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from transferkit.data.image_files import ImageFiles
from transferkit.data.progress import progress_bar


def pipeline(x: np.ndarray | ImageFiles, y: np.ndarray | ImageFiles | None = None, batch_size: int = 64,
             shuffle: bool = False, seed: int = 0):
    """A batched, prefetched `tf.data.Dataset` of `x` (and `y`): the one way into tf.data for every pass.

    Arrays are cached in the dataset. `ImageFiles` are decoded image by image
    in a parallel, ordered map (`ImageFiles.examples`), never all at once; the
    shuffled order is the one the same arrays would get (a shuffle of the row
    numbers with `seed`). `x` may also be an unbatched, already cached
    `tf.data.Dataset` (spilled features).
    """
    import tensorflow as tf

    if isinstance(x, ImageFiles) or isinstance(y, ImageFiles):
        source = x if isinstance(x, ImageFiles) else y
        ds = source.examples((x,) if y is None else (x, y), shuffle, seed)
        return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)
    if isinstance(x, tf.data.Dataset):
        ds = x if y is None else tf.data.Dataset.zip((x, tf.data.Dataset.from_tensor_slices(y)))
    else:
        ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x) if y is None else len(y), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def batches_of(x: np.ndarray | ImageFiles, batch_size: int = 256, desc: str | None = None):
    """`x` batch by batch as numpy arrays, in order; a progress bar on stderr titled `desc` for long passes.

    Arrays are sliced; `ImageFiles` decoded through `pipeline`.
    """
    decoded = pipeline(x, batch_size=batch_size) if isinstance(x, ImageFiles) else None
    with progress_bar(len(x) if desc else 0, desc or "") as tick:
        if decoded is not None:
            for batch in decoded:
                batch = batch.numpy()
                yield batch
                tick(len(batch))
        else:
            for start in range(0, len(x), batch_size):
                yield x[start:start + batch_size]
                tick(min(batch_size, len(x) - start))


def rows_of(x: np.ndarray | ImageFiles, rows: np.ndarray) -> np.ndarray:
    """`x[rows]` as one array; of image files only those rows are decoded (`ImageFiles.rows`)."""
    return x.rows(rows) if isinstance(x, ImageFiles) else np.asarray(x[rows])


def as_array(x: np.ndarray | ImageFiles) -> np.ndarray:
    """`x` as one array, decoding image files on purpose: for the few passes that cannot stream, of a bounded size."""
    return x.decode() if isinstance(x, ImageFiles) else x


def learning_rate_data(x: Any, y: np.ndarray | None, batch_size: int) -> Any:
    """What the LR finder sweeps over: `(x, y)` arrays, for image files a shuffled pipeline of them, or `x`
    itself when `y` is `None` (a `tf.data.Dataset` of `(x, y)` batches built in a pipeline)."""
    if y is None:
        return x
    return pipeline(x, y, batch_size, shuffle=True) if isinstance(x, ImageFiles) else (x, y)


@dataclasses.dataclass(frozen=True)
class StageBatches:
    """A training stage's data as tf.data, made at once (see `stage_batches`)."""

    train: Any  # shuffled batches, reshuffled every epoch
    validation: Any  # batches in order, or None
    unshuffled: Callable[[], Any]  # the training batches in order, made the first time they are asked for
    sweep: Any  # what the LR finder sweeps (`learning_rate_data`), or None


def stage_batches(x: Any, y: np.ndarray, batch_size: int, seed: int, validation: tuple[Any, np.ndarray] | None = None,
                  sweep_batch_size: int | None = None) -> StageBatches:
    """A stage's training batches of `(x, y)` shuffled with `seed`, its validation batches, the training batches in
    order (made only where used: training health, JAX's compiled loss), and with `sweep_batch_size` the LR finder's
    data."""
    sweep = None if sweep_batch_size is None else learning_rate_data(x, y, sweep_batch_size)
    unshuffled = functools.cache(functools.partial(pipeline, x, y, batch_size))
    train = pipeline(x, y, batch_size, shuffle=True, seed=seed)
    checked = None if validation is None else pipeline(*validation, batch_size)
    return StageBatches(train, checked, unshuffled, sweep)
