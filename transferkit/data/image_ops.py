"""Image files decoded and resized inside a `tf.data` map, as `keras.utils.image_dataset_from_directory` does.

The fast path of `transferkit.data.image_files`. A plain file (8-bit RGB or gray
JPEG or PNG, upright, opaque: `transferkit.data.images.check_images` says which)
is decoded by `tf.io`, in parallel and without Python; JPEGs with libjpeg's
accurate integer DCT, the one Pillow uses, so the levels are Pillow's, bit for
bit (Keras's pipeline uses `tf.io.decode_image`'s default, the fast DCT, which
differs by up to 4 levels). Any other file is decoded by Pillow to its true
levels at its own size (`transferkit.data.images.decode_image`) in a
`tf.numpy_function`. Either way the levels are then resized by `fit_size_op`,
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


# a plain file's format, told by its suffix: `check_images` marks a file plain only where they agree
PLAIN_FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG"}


def plain_format(path: str | Path) -> str | None:
    """`"JPEG"` or `"PNG"` by the suffix of `path`, else `None`."""
    return PLAIN_FORMATS.get(Path(path).suffix.lower())


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


def fit_size_op(image, size: tuple[int, int], resize: str):
    """`image` (a `(H, W, C)` tensor or array of levels) as float32 at `size`, resized as Keras's pipeline does.

    `keras.utils.image_dataset_from_directory`'s three ways, bilinear without
    antialiasing: `stretch` is `tf.image.resize`; `crop` cuts the centered box of
    the target's aspect ratio first (`crop_to_aspect_ratio`, `smart_resize`'s
    box in its float32 arithmetic); `pad` is `tf.image.resize_with_pad`
    (`pad_to_aspect_ratio`: fitted inside, then black margins, the larger one
    after an odd difference). An image already at `size` comes back unchanged
    in every mode (with half-pixel centers each output pixel lands on an input
    pixel), so no `tf.cond` guards the resize: it would cost more per image than
    the resize it saves.
    """
    import tensorflow as tf

    image = tf.convert_to_tensor(image)
    height, width = size
    if resize == "pad":
        out = tf.image.resize_with_pad(image, height, width, method="bilinear")
    else:
        out = tf.image.resize(_center_box(image, size) if resize == "crop" else image, size, method="bilinear")
    return tf.ensure_shape(out, (height, width, image.shape[-1]))


def _center_box(image, size: tuple[int, int]):
    """The centered part of `image` with the aspect ratio of `size`, as Keras's `smart_resize` cuts it."""
    import tensorflow as tf

    target_h, target_w = size
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    box_h = tf.cast(tf.cast(width * target_h, tf.float32) / target_w, tf.int32)
    box_w = tf.cast(tf.cast(height * target_w, tf.float32) / target_h, tf.int32)
    box_h, box_w = tf.maximum(tf.minimum(height, box_h), 1), tf.maximum(tf.minimum(width, box_w), 1)
    top = tf.cast(tf.cast(height - box_h, tf.float32) / 2, tf.int32)
    left = tf.cast(tf.cast(width - box_w, tf.float32) / 2, tf.int32)
    return image[top:top + box_h, left:left + box_w]


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
    from transferkit.data.images import decode_image

    path = Path(path.decode() if isinstance(path, bytes) else path)
    return decode_image(path, channels).astype("float32", copy=False)


def pillow_decode_bytes(encoded: bytes, size: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    """One encoded image decoded by Pillow and brought to `size` (`transferkit.data.images.fit_size`)."""
    from transferkit.data.images import decode_image, fit_size

    return fit_size(decode_image(bytes(encoded), channels), size, resize)
