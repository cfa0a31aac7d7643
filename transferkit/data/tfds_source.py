"""`tfds:NAME[:SPLIT]`: a tensorflow-datasets split read through `tf.data` on every pass, never held as one array.

Loading makes one pass over the split with the images left encoded
(`tfds.decode.SkipDecoding`): the labels (8 bytes an example) and, when the
images differ in size, each one's size from its header. The images are then
`TfdsImages`: an `ImageFiles` whose files are the split's records. A pass
streams the split in its stored order (`shuffle_files=False`), keeps the rows
of the selection (a train / validation / test part is a selection of row
numbers, as for any array), shuffles within a bounded buffer of encoded images
when asked, and decodes in a parallel map as a folder's files are decoded
(`transferkit.data.image_ops`: 8-bit gray or RGB by `tf.io`, others by Pillow),
resized by `fit_size` when `--image-size` asks for another size. Memory holds
the labels and a fixed buffer, whatever the split's length.

Random access (pretraining shuffles row numbers each epoch and gathers them)
reads a copy of the split's encoded images written once per process into a
temporary folder, one file per example, removed at exit: disk, not memory.

Example:

>>> import tensorflow_datasets as tfds
>>> from transferkit.data.sources import load_data, pipeline
>>> with tfds.testing.mock_data(num_examples=12):   # doctest: +SKIP
...     data = load_data("tfds:mnist")
...     batches = pipeline(data.x[:8], data.y[:8], batch_size=4)
"""

from __future__ import annotations

import atexit
import dataclasses
import hashlib
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import SettingsError, TransferkitError
from transferkit.data.image_files import ImageFiles, gather_together

SHUFFLE_BUFFER = 4096  # encoded images held to shuffle a pass (about 100 MiB of JPEG photos)


@dataclasses.dataclass(frozen=True)
class TfdsSplit:
    """Where a split's images come from: what `tfds.load` needs, and what the images are."""

    name: str
    split: str
    image_key: str
    count: int
    plain: bool  # 8-bit, 1 or 3 channels: tf.io decodes them to Pillow's pixels
    identity: str  # name, version, split and size: the fingerprint's part from tfds

    def records(self):
        """The split's encoded images, in stored order, as a `tf.data.Dataset` of strings."""
        import tensorflow_datasets as tfds

        ds = tfds.load(self.name, split=self.split, shuffle_files=False,
                       decoders={self.image_key: tfds.decode.SkipDecoding()})
        return ds.map(lambda example: example[self.image_key])

    def spill(self) -> Path:
        """A folder holding every image of the split as a file named by its row (written once per process)."""
        import tensorflow as tf

        if self not in _SPILLED:
            folder = Path(tempfile.mkdtemp(prefix="transferkit-tfds-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            with tf.init_scope():  # asked for while a tf.data map is traced: read the split eagerly
                for row, encoded in enumerate(self.records().as_numpy_iterator()):
                    (folder / f"{row}").write_bytes(encoded)
            _SPILLED[self] = folder
        return _SPILLED[self]


_SPILLED: dict[TfdsSplit, Path] = {}


class TfdsImages(ImageFiles):
    """Rows of a tensorflow-datasets split, decoded only when read: see the module docstring.

    Args:
        source: `TfdsSplit`. The split.
        rows: Sequence of row numbers into the split (the selection, in its order).
        size: `(height, width)` every image is brought to.
        channels: Integer, 1 or 3.
        resize: String, `"stretch"`, `"crop"` or `"pad"`. Defaults to `"stretch"`.
        standardize: Optional `(mean, std)` per channel, as for `ImageFiles`. Defaults to `None`.
    """

    def __init__(self, source: TfdsSplit, rows, size: tuple[int, int], channels: int, resize: str = "stretch",
                 standardize: tuple[np.ndarray, np.ndarray] | None = None):
        self._settings(size, channels, resize, standardize)
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.root = None

    @property
    def paths(self) -> np.ndarray:
        """The files of the split's copy on disk (`TfdsSplit.spill`), written when first asked for."""
        folder = self.source.spill()
        return np.array([str(folder / str(row)) for row in self.rows], dtype=object)

    @property
    def plain(self) -> np.ndarray:
        return np.full(len(self.rows), self.source.plain)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return (f"TfdsImages({self.source.name}:{self.source.split}, {len(self)} rows, size={self.size}, "
                f"channels={self.channels}, resize={self.resize!r})")

    def _with(self, key, **changes: Any) -> "TfdsImages":
        settings = dict(size=self.size, channels=self.channels, resize=self.resize, standardize=self.standardize)
        return TfdsImages(self.source, self.rows[key], **{**settings, **changes})

    @property
    def selection(self) -> tuple[Any, np.ndarray]:
        """The split and its rows (`ImageFiles.same_files` compares them; the copy on disk is not written for it)."""
        return self.source, self.rows

    def examples(self, items: tuple, shuffle: bool = False, seed: int = 0):
        """The rows of `items` streamed from tfds (see the module docstring); an unbatched `tf.data.Dataset`.

        A selection out of the split's order (or with repeats) is read from the copy on disk instead.
        """
        import tensorflow as tf

        if len(self.rows) and not np.all(np.diff(self.rows) > 0):
            return super().examples(items, shuffle, seed)
        position = np.full(self.source.count, -1, dtype=np.int64)
        position[self.rows] = np.arange(len(self.rows))
        position = tf.constant(position)
        ds = self.source.records().enumerate().map(lambda row, encoded: (tf.gather(position, row), encoded))
        ds = ds.filter(lambda at, encoded: at >= 0).take(len(self.rows))
        ds = ds.apply(tf.data.experimental.assert_cardinality(len(self.rows)))  # Keras then knows the batches
        if shuffle:
            ds = ds.shuffle(max(1, min(len(self.rows), SHUFFLE_BUFFER)), seed=seed, reshuffle_each_iteration=True)

        def row(at, encoded):
            values = tuple(gather_together(items, at, decoded=[(self, self.decode_op(encoded))]))
            return values if len(values) > 1 else values[0]

        return ds.map(tf.autograph.experimental.do_not_convert(row), num_parallel_calls=tf.data.AUTOTUNE,
                      deterministic=True)

    def decode_op(self, encoded):
        """One encoded image (a string tensor) decoded and brought to `size`, not standardized."""
        import tensorflow as tf

        from transferkit.data.image_ops import decode_plain_op, fit_size_op, pillow_decode_bytes

        if self.source.plain:
            levels = decode_plain_op(encoded, self.channels)
        else:  # Pillow's levels at the image's own size; resized in the graph below, as a folder's files are
            levels = tf.numpy_function(lambda data: pillow_decode_bytes(data, self.channels), [encoded], tf.float32,
                                       stateful=False)
            levels = tf.ensure_shape(levels, (None, None, self.channels))
        return fit_size_op(levels, self.size, self.resize)

    def fingerprint_into(self, h) -> None:
        """Feed `h` the split's identity (name, version, split, size), the selection and the decode settings."""
        h.update(repr((self.source.identity, self.shape, self.resize)).encode())
        h.update(self.rows.tobytes())

    @property
    def key(self) -> str:
        h = hashlib.sha256()
        h.update(repr((self.source.identity, self.shape, self.resize, self.standardize is None)).encode())
        h.update(self.rows.tobytes())
        return h.hexdigest()


def load_tfds(arg: str, image_size: int | tuple[int, int] | None, resize: str) -> tuple[TfdsImages, np.ndarray | None, Any]:
    """`tfds:` data: the split's images (lazy), its labels and class names (or `None`s), in one pass."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    name, _, split = arg.partition(":")
    check_tfds_reachable(tfds, name)
    try:
        builder = tfds.builder(name)
        info = builder.info
    except Exception as err:  # tfds raises many kinds: unknown name, no network, bad split
        raise TransferkitError(f"tensorflow-datasets could not load {arg!r}: {str(err).splitlines()[0]}") from None
    features = info.features
    image_key = next((k for k, f in features.items() if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k, f in features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    if image_key is None:
        raise SettingsError(f"Dataset {name!r} has no image feature; expected one of type tfds.features.Image.")
    image = features[image_key]
    height, width, stored = image.shape
    fixed = height is not None and width is not None
    try:
        ds = tfds.load(name, split=split or "train", shuffle_files=False,
                       decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as err:
        raise TransferkitError(f"tensorflow-datasets could not load {arg!r}: {str(err).splitlines()[0]}") from None
    ds = ds.map(lambda e: (e[label_key] if label_key else tf.constant(0, tf.int64),
                           tf.zeros(2, tf.int32) if fixed else encoded_size(e[image_key])),
                num_parallel_calls=tf.data.AUTOTUNE)
    labels, sizes = [], []
    for label, size in ds.batch(4096).as_numpy_iterator():
        labels.append(label)
        sizes.append(size)
    count = sum(len(s) for s in sizes)
    if image_size:
        target = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    elif fixed:
        target = (height, width)
    else:
        from transferkit.data.image_size import common_size

        target = common_size([tuple(s) for s in np.concatenate(sizes)]) if count else (1, 1)
    channels = 1 if stored in (1, 2) else 3
    plain = np.dtype(image.np_dtype) == np.uint8 and stored in (1, 3)
    identity = f"{name}:{split or 'train'}:{info.version}:{count}"
    source = TfdsSplit(name, split or "train", image_key, count, bool(plain), identity)
    y = np.concatenate(labels).astype("int64") if label_key is not None and count else None
    names = tuple(features[label_key].names) if label_key is not None else None
    return TfdsImages(source, np.arange(count), target, channels, resize), y, names


def encoded_size(encoded):
    """`(height, width)` of a JPEG or PNG from its header (a string tensor), without decoding it."""
    import tensorflow as tf

    def png():
        header = tf.cast(tf.io.decode_raw(tf.strings.substr(encoded, 16, 8), tf.uint8), tf.int32)
        big_endian = header[0::4] * 2**24 + header[1::4] * 2**16 + header[2::4] * 2**8 + header[3::4]
        return tf.stack([big_endian[1], big_endian[0]])  # IHDR holds the width first

    return tf.cond(tf.io.is_jpeg(encoded), lambda: tf.image.extract_jpeg_shape(encoded)[:2], png)


def check_tfds_reachable(tfds, name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes of retries, when `name` is not prepared here and there is no network."""
    try:
        builder = tfds.builder(name)
    except Exception as err:  # unknown name: tfds suggests close ones
        raise SettingsError(f"tensorflow-datasets has no dataset {name!r}: {str(err).splitlines()[0]}") from None
    if Path(builder.data_dir).joinpath("dataset_info.json").exists() or _tfds_is_mocked(tfds):
        return
    try:
        socket.create_connection(("storage.googleapis.com", 443), timeout=timeout).close()
    except OSError:
        raise TransferkitError(
            f"tfds:{name} is not prepared in {builder.data_dir!r} and there is no network to download it; "
            "prepare it on a machine with network (tfds build) or use npz: or dir: data."
        ) from None


def _tfds_is_mocked(tfds) -> bool:
    """Under `tfds.testing.mock_data`, loading needs neither files nor network."""
    return "mock" in type(tfds.core.DatasetBuilder.as_dataset).__name__.lower() or "mock" in repr(
        tfds.core.DatasetBuilder.as_dataset).lower()
