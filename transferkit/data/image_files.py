"""A folder's images as a lazy array: the file list and how to decode it, decoded only batch by batch.

`ImageFiles` stands where a `(N, H, W, C)` float32 array of decoded images
would: it has `len`, `shape`, `dtype` and `ndim`, and indexing it with a slice
or an index array gives another `ImageFiles` (nothing is decoded).
`transferkit.data.pipelines.pipeline` decodes the files one by one in a parallel `tf.data`
map: plain files (`transferkit.data.images.check_images` says which) by TensorFlow
ops, the others by Pillow, then resizes them in the graph as Keras's
`image_dataset_from_directory` does (`transferkit.data.image_ops`); the pixels are
those `read_images` gives, bit for bit. `decode()` reads a few into an array on
purpose (pictures of 8 samples), through the same ops. Converting a large one
with `np.asarray` still works but warns: memory then grows with the number of images.

Example:

>>> from transferkit.data.image_files import ImageFiles
>>> files = ImageFiles(["a.png", "b.png", "c.png"], size=(32, 32), channels=3)
>>> files.shape, files[[2, 0]].paths.tolist()
((3, 32, 32, 3), ['c.png', 'a.png'])
"""

from __future__ import annotations

import hashlib
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.recipe import RESIZE_MODES

# np.asarray(files) decodes silently up to this many images (a batch, a picture), and warns past it
QUIET_DECODE = 512


class ImageFiles:
    """Image files with one size, channel count and resize mode: an array-like decoded only when read.

    Args:
        paths: Sequence of file paths (already checked to decode).
        size: `(height, width)` every image is brought to.
        channels: Integer, 1 or 3.
        resize: String, `"stretch"`, `"crop"` or `"pad"` (see `transferkit.data.images.fit_size_op`).
            Defaults to `"stretch"`.
        root: Optional folder the paths lie under: the fingerprint names files relative to it.
        standardize: Optional `(mean, std)` per channel: the decoded values become `(v - mean) / std`
            (the targets of an autoencoder). Defaults to `None`.
        plain: Optional boolean per path: which files TensorFlow ops decode (`Checked.plain`).
            Defaults to `None`: every file through Pillow.
    """

    dtype = np.dtype("float32")
    ndim = 4

    def __init__(self, paths, size: tuple[int, int], channels: int, resize: str = "stretch",
                 root: str | Path | None = None, standardize: tuple[np.ndarray, np.ndarray] | None = None,
                 plain: np.ndarray | None = None):
        self._settings(size, channels, resize, standardize)
        self.paths = paths if isinstance(paths, np.ndarray) else np.array([str(p) for p in paths], dtype=object)
        self.root = None if root is None else str(root)
        self.plain = np.zeros(len(self.paths), bool) if plain is None else np.asarray(plain, dtype=bool)
        if self.plain.shape != (len(self.paths),):
            raise ValueError(f"plain must hold one boolean per path ({len(self.paths)}). "
                             f"Received: plain of shape {self.plain.shape}")

    def _settings(self, size, channels, resize, standardize) -> None:
        """Check and keep how every image is read (shared with the other kinds of lazy images)."""
        if resize not in RESIZE_MODES:
            raise ValueError(f"resize must be one of {', '.join(RESIZE_MODES)}. Received: resize={resize!r}")
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3. Received: channels={channels!r}")
        self.size = (int(size[0]), int(size[1]))
        self.channels = int(channels)
        self.resize = resize
        self.standardize = standardize

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.size, self.channels)

    @property
    def nbytes(self) -> int:
        """The bytes the decoded array would take (it is never built unless asked for)."""
        return int(np.prod(self.shape)) * 4

    def __len__(self) -> int:
        return len(self.paths)

    def __repr__(self) -> str:
        return f"ImageFiles({len(self)} files, size={self.size}, channels={self.channels}, resize={self.resize!r})"

    def _with(self, key, **changes: Any) -> "ImageFiles":
        settings = dict(size=self.size, channels=self.channels, resize=self.resize, root=self.root,
                        standardize=self.standardize)
        return ImageFiles(self.paths[key], plain=self.plain[key], **{**settings, **changes})

    def __getitem__(self, key):
        """A slice or index array: another `ImageFiles`; an integer: that image decoded; anything else: decoded, then indexed."""
        if isinstance(key, (int, np.integer)):
            return self._with([key]).decode()[0]
        if isinstance(key, slice) or (isinstance(key, (list, np.ndarray)) and np.asarray(key).ndim == 1):
            return self._with(key)
        return np.asarray(self)[key]

    def standardized(self, mean: np.ndarray, variance: np.ndarray) -> "ImageFiles":
        """The same files read as `(v - mean) / sqrt(variance)` (Keras's `Normalization`, its epsilon included)."""
        std = np.maximum(np.sqrt(np.asarray(variance, "float32")), np.float32(1e-7))
        return self._with(slice(None), standardize=(np.asarray(mean, "float32"), std))

    @property
    def selection(self) -> tuple[Any, np.ndarray]:
        """Where the images come from and which of them: no source of their own, and the paths."""
        return None, self.paths

    def same_files(self, other: Any) -> bool:
        """Whether `other` (of the same kind) reads the same images the same way (perhaps standardized otherwise):
        one decode serves both."""
        if not (isinstance(other, ImageFiles) and type(other) is type(self)):
            return False
        (source, chosen), (other_source, other_chosen) = self.selection, other.selection
        return ((self.size, self.channels, self.resize) == (other.size, other.channels, other.resize)
                and source == other_source and (chosen is other_chosen or np.array_equal(chosen, other_chosen)))

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """The images at `rows` (in that order) as one array; only they are decoded, in stored order (a tfds
        split then streams once, without its copy on disk)."""
        ascending = np.argsort(rows, kind="stable")
        decoded = self[np.asarray(rows)[ascending]].decode()
        out = np.empty_like(decoded)
        out[ascending] = decoded
        return out

    def decode(self) -> np.ndarray:
        """Every image of this (small) selection as one `(N, H, W, C)` float32 array, decoded as `pipeline` does."""
        if not len(self):
            return np.empty(self.shape, dtype="float32")
        return np.concatenate([batch.numpy() for batch in self.examples((self,)).batch(256)])

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        if len(self) > QUIET_DECODE:
            warnings.warn(f"Decoding {len(self)} images into one array of {self.nbytes / 2**20:.0f} MiB: memory grows "
                          "with the number of images here (stream them with transferkit.data.pipelines.pipeline).",
                          ResourceWarning, stacklevel=2)
        x = self.decode()
        return x if dtype is None else x.astype(dtype, copy=False)

    def read(self, index):
        """A TensorFlow op: the image at `index` (an int tensor), or the images at `index` (1-D), not standardized.

        A tfds split's rows are read from its copy on disk (random access)."""
        import tensorflow as tf

        from transferkit.data.image_ops import read_image_op
        from transferkit.data.images import plain_format

        index = tf.convert_to_tensor(index)
        files, plain_files = self.paths, self.plain  # a tfds split's: its copy on disk, written when first asked for
        with tf.init_scope():  # made once, eagerly, and captured: not a constant copied into each traced graph
            paths, plain = tf.constant(files.astype(str)), tf.constant(plain_files)
        alike = plain_files.all() or not plain_files.any()  # then one branch serves every file
        formats = {plain_format(path) for path in files[plain_files]}
        format = formats.pop() if len(formats) == 1 else None  # then one decoder serves every plain file

        def one(i):
            return read_image_op(tf.gather(paths, i), bool(plain_files.all()) if alike else tf.gather(plain, i),
                                 self.size, self.channels, self.resize, format)

        if index.shape.rank == 0:
            return one(index)
        return tf.map_fn(one, index, fn_output_signature=tf.TensorSpec((*self.size, self.channels), tf.float32))

    def examples(self, items: tuple, shuffle: bool = False, seed: int = 0):
        """An unbatched `tf.data.Dataset` of the rows of `items` (this and arrays or image files of its length).

        Rows in order, or shuffled as the row numbers would be with `seed`;
        each decoded in a parallel, ordered map. The map's function is traced
        as written, not through AutoGraph (it has no Python control flow on
        tensors; converting it took ~1.5 s a pass, as long as decoding 4,000 images).
        """
        import tensorflow as tf

        ds = tf.data.Dataset.range(len(self))
        if shuffle:
            ds = ds.shuffle(len(self), seed=seed, reshuffle_each_iteration=True)

        def row(i):
            values = tuple(gather_together(items, i))
            return values if len(values) > 1 else values[0]

        return ds.map(tf.autograph.experimental.do_not_convert(row), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)

    def gather(self, indices):
        """A TensorFlow op: the images at `indices` (a 1-D int tensor), decoded and standardized."""
        return gather_together([self], indices)[0]

    def fingerprint_into(self, h) -> None:
        """Feed `h` the files' names (relative to `root`), byte sizes and modification times, and the decode settings."""
        h.update(repr((self.shape, self.resize)).encode())
        for path in self.paths:
            stat = os.stat(path)
            name = os.path.relpath(path, self.root) if self.root else path
            h.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())

    @property
    def key(self) -> str:
        """A hash of the files and settings (not of their contents): same key, same decoded images."""
        h = hashlib.sha256()
        h.update(repr((self.shape, self.resize, self.standardize is None)).encode())
        for path in self.paths:
            h.update(f"{path}\n".encode())
        return h.hexdigest()


def gather_together(items, indices, decoded: list | None = None) -> list:
    """The rows `indices` (an int tensor: one row, or 1-D) of each of `items` (arrays, tensors or `ImageFiles`).

    `ImageFiles` reading the same files are decoded once (an autoencoder's
    inputs and its standardized targets), by `ImageFiles.read`, unless
    `decoded` already holds `(files, raw tensor)` for them; then standardized
    where they ask to be.
    """
    import tensorflow as tf

    out: list = [None] * len(items)
    decoded = list(decoded or [])
    for i, item in enumerate(items):
        if not isinstance(item, ImageFiles):
            out[i] = tf.gather(item, indices)
            continue
        raw = next((tensor for files, tensor in decoded if files.same_files(item)), None)
        if raw is None:
            raw = item.read(indices)
            decoded.append((item, raw))
        out[i] = raw if item.standardize is None else (raw - item.standardize[0]) / item.standardize[1]
    return out
