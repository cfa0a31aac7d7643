"""Image files decoded and resized inside a `tf.data` map, as `keras.utils.image_dataset_from_directory` does.

The fast path of `transferkit.data.image_files`. A plain file (8-bit RGB or gray
JPEG or PNG, upright, opaque: `transferkit.data.images.check_images` says which)
is decoded by `tf.io`, in parallel and without Python; JPEGs with libjpeg's
accurate integer DCT, the one Pillow uses, so the levels are Pillow's, bit for
bit (Keras's pipeline uses `tf.io.decode_image`'s default, the fast DCT, which
differs by up to 4 levels); when every plain file of a selection has one format
(by its suffix, which `check_images` made sure agrees), by that one decoder,
without a `tf.cond`. Any other file is decoded by Pillow to its true
levels at its own size (`transferkit.data.images.decode_image`) in a
`tf.numpy_function`. Either way the levels are then resized by `images.fit_size_op`,
the graph ops Keras's pipeline runs (`tf.image.resize`, bilinear, without
antialiasing), so a file gives the pixels Keras's pipeline gives for the same
levels.

Example:

>>> import tensorflow as tf
>>> from transferkit.data.image_ops import read_image_op
>>> image = read_image_op(tf.constant("cat.jpg"), True, (160, 160), 3, "stretch")   # doctest: +SKIP
>>> image.shape                                                                      # doctest: +SKIP
TensorShape([160, 160, 3])
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from transferkit.data.images import decode_image, fit_size_op


def decode_plain_op(contents, channels: int, format: str | None = None):
    """An 8-bit JPEG or PNG held in `contents` (a string tensor) as `(H, W, channels)` uint8, as Pillow reads it.

    `format` (`"JPEG"` or `"PNG"`) when known for every file: one decoder in the
    graph (a `tf.cond` costs ~4% of reading an image); else told by the bytes.
    """
    import tensorflow as tf

    def jpeg():
        return tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE")

    def png():
        return tf.io.decode_png(contents, channels=channels)

    if format is not None:
        return jpeg() if format == "JPEG" else png()
    return tf.cond(tf.io.is_jpeg(contents), jpeg, png)


def read_image_op(path, plain, size: tuple[int, int], channels: int, resize: str, format: str | None = None):
    """The image file at `path` (a string tensor) at `size`, float32 levels 0..255.

    `plain` (a boolean tensor, or one bool for every file): decode with `tf.io`
    (`decode_plain_op`, of `format` when every plain file has it); else with
    Pillow (`pillow_levels`). Then `fit_size_op`.
    """
    import tensorflow as tf

    def fast():
        return decode_plain_op(tf.io.read_file(path), channels, format)

    def slow():
        out = tf.numpy_function(lambda p: pillow_levels(p, channels), [path], tf.float32, stateful=False)
        return tf.ensure_shape(out, (None, None, channels))

    if isinstance(plain, bool):  # every file of the selection alike: one branch in the graph
        image = fast() if plain else slow()
    else:
        image = tf.cond(plain, lambda: tf.cast(fast(), tf.float32), slow)  # resized from uint8 or float32 alike
    return fit_size_op(image, size, resize)


def pillow_levels(path, channels: int) -> np.ndarray:
    """One file decoded by Pillow at its own size (`transferkit.data.images.decode_image`): float32 levels."""
    path = Path(path.decode() if isinstance(path, bytes) else path)
    return decode_image(path, channels).astype("float32", copy=False)


def pillow_decode_bytes(encoded: bytes, channels: int) -> np.ndarray:
    """One encoded image decoded by Pillow at its own size (`transferkit.data.images.decode_image`): float32 levels."""
    return decode_image(bytes(encoded), channels).astype("float32", copy=False)
