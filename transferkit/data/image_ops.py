"""Image files decoded inside a `tf.data` map: TensorFlow ops where they give Pillow's pixels, Pillow elsewhere.

The fast path of `transferkit.data.image_files`. A plain file (8-bit RGB or gray
JPEG or PNG, upright, opaque: `transferkit.data.images.check_images` says which) is
decoded by `tf.io`, in parallel and without Python; JPEGs with libjpeg's
accurate integer DCT, the one Pillow uses, so the pixels are Pillow's, bit for
bit (`tf.io.decode_image`'s default, the fast DCT, differs by up to 4 levels).
When it already has the size asked for, that is all. Otherwise it is resized by
`transferkit.data.images.fit_size` (Pillow's bicubic filter, which `tf.image.resize`
does not reproduce: its bilinear differs by tens of levels, its antialiased
bicubic by up to 8 where Pillow rounds between its two passes) in a
`tf.numpy_function`; Pillow releases the GIL while it resamples. Any other file
is decoded by Pillow too (`decode_image`). Either way the pixels are those
`transferkit.data.images.read_images` gives.

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


def decode_plain_op(contents, channels: int):
    """An 8-bit JPEG or PNG held in `contents` (a string tensor) as `(H, W, channels)` uint8, as Pillow reads it."""
    import tensorflow as tf

    return tf.cond(tf.io.is_jpeg(contents),
                   lambda: tf.io.decode_jpeg(contents, channels=channels, dct_method="INTEGER_ACCURATE"),
                   lambda: tf.io.decode_png(contents, channels=channels))


def fit_size_op(image, size: tuple[int, int], resize: str):
    """`image` (a `(H, W, C)` tensor) as float32 at `size`: itself when it has that size, else `fit_size`'s pixels."""
    import tensorflow as tf

    def pillow():
        out = tf.numpy_function(lambda values: _fit(values, size, resize), [image], tf.float32, stateful=False)
        return tf.ensure_shape(out, (*size, image.shape[-1]))

    same = tf.reduce_all(tf.shape(image)[:2] == tf.constant(size))
    return tf.cond(same, lambda: tf.ensure_shape(tf.cast(image, tf.float32), (*size, image.shape[-1])), pillow)


def read_image_op(path, plain, size: tuple[int, int], channels: int, resize: str):
    """The image file at `path` (a string tensor) at `size`, float32 levels 0..255.

    `plain` (a boolean tensor, or one bool for every file): decode with `tf.io`;
    else with Pillow (`transferkit.data.images.decode_image`, then `fit_size`).
    """
    import tensorflow as tf

    def fast():
        return fit_size_op(decode_plain_op(tf.io.read_file(path), channels), size, resize)

    def slow():
        out = tf.numpy_function(lambda p: pillow_read(p, size, channels, resize), [path], tf.float32,
                                stateful=False)
        return tf.ensure_shape(out, (*size, channels))

    if isinstance(plain, bool):  # every file of the selection alike: one branch in the graph
        return fast() if plain else slow()
    return tf.cond(plain, fast, slow)


def pillow_read(path, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """One file decoded by Pillow and fitted to `size` (`transferkit.data.images`): float32 levels."""
    from transferkit.data.images import decode_image

    path = Path(path.decode() if isinstance(path, bytes) else path)
    return _fit(decode_image(path, channels), size, resize)


def pillow_decode_bytes(encoded: bytes, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """One encoded image decoded by Pillow and fitted to `size`, as `pillow_read` reads a file."""
    from transferkit.data.images import decode_image

    return _fit(decode_image(bytes(encoded), channels), size, resize)


def _fit(values: np.ndarray, size: tuple[int, int], resize: str) -> np.ndarray:
    from transferkit.data.images import fit_size

    return fit_size(values, size, resize).astype("float32", copy=False)
