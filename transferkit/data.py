"""Data specs, the seeded train / validation / test split, and tf.data pipelines.

A data spec is a string: `digits` (scikit-learn's bundled 8x8 digits, the
default), `npz:PATH` (arrays `x` and optional `y`), `dir:PATH` (an image folder:
one sub-folder per class, or images alone for unlabeled data) or
`tfds:NAME[:SPLIT]` (tensorflow-datasets).

Example:

>>> from transferkit.data import load_data, split_data
>>> data = load_data("digits")
>>> data.x.shape, data.num_classes
((1797, 8, 8, 1), 10)
>>> split = split_data(data, seed=0, label_fraction=0.05)
>>> len(split.test), len(split.labeled)
(360, 64)
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import SettingsError, TransferkitError

SCHEMES = ("digits", "npz", "dir", "tfds")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif")


@dataclasses.dataclass(frozen=True)
class Data:
    """Inputs, optional integer labels, and what is known about them."""

    x: np.ndarray
    y: np.ndarray | None
    spec: str
    class_names: tuple[str, ...] | None
    value_range: tuple[float, float]

    @property
    def num_classes(self) -> int:
        if self.class_names is not None:
            return len(self.class_names)
        return 0 if self.y is None else int(self.y.max()) + 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(int(d) for d in self.x.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """A short hash of the inputs and labels: the same data gives the same fingerprint."""
        h = hashlib.sha256(np.ascontiguousarray(self.x).tobytes())
        if self.y is not None:
            h.update(np.ascontiguousarray(self.y).tobytes())
        return h.hexdigest()[:16]


@dataclasses.dataclass(frozen=True)
class Split:
    """Indices into `Data.x` for each part; `labeled` is the subset of `train` whose labels are used."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    labeled: np.ndarray
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Split":
        return cls(**{k: (np.asarray(v, dtype=np.int64) if k != "seed" else int(v)) for k, v in d.items()})


def parse_spec(spec: str) -> tuple[str, str]:
    """Split a data spec into its scheme and argument, checking the scheme."""
    scheme, _, arg = spec.partition(":")
    if scheme not in SCHEMES:
        raise SettingsError(
            f"Unknown data scheme {scheme!r} in {spec!r}; expected digits, npz:PATH, dir:PATH or tfds:NAME[:SPLIT]."
        )
    if scheme != "digits" and not arg:
        raise SettingsError(f"Data spec {spec!r} needs a value after '{scheme}:'.")
    if scheme in ("npz", "dir") and not Path(arg).exists():
        raise SettingsError(f"Data path {arg!r} does not exist; expected an existing {'file' if scheme == 'npz' else 'folder'}.")
    return scheme, arg


def load_data(spec: str = "digits", image_size: int | None = None) -> Data:
    """Load a data spec into arrays. Images are `(N, H, W, C)` float32; vectors `(N, D)`.

    Args:
        spec: String. A data spec (see the module docstring). Defaults to `"digits"`.
        image_size: Optional integer. Resize `dir:` and `tfds:` images to this square size.

    Raises:
        SettingsError: an unknown scheme, a missing path, an empty folder, arrays without `x`.
    """
    scheme, arg = parse_spec(spec)
    loader = {"digits": _load_digits, "npz": _load_npz, "dir": _load_dir, "tfds": _load_tfds}[scheme]
    data = loader(spec, arg, image_size)
    if len(data.x) == 0:
        raise SettingsError(f"Data spec {spec!r} holds no examples; expected at least one.")
    bad = int(np.size(data.x) - np.count_nonzero(np.isfinite(data.x)))
    if bad:
        raise SettingsError(f"Data {spec!r} has {bad} NaN or infinite input values; expected finite numbers.")
    if data.y is not None and data.y.min() < 0:
        raise SettingsError(f"Data {spec!r} has label {int(data.y.min())}; expected class numbers 0, 1, 2, ...")
    return data


def split_data(
    data: Data,
    seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    label_fraction: float = 1.0,
    label_seed: int | None = None,
) -> Split:
    """A fixed, seeded split into train / validation / test, stratified when labels exist.

    `label_fraction` keeps labels for that fraction of each class of the training
    part (at least one per class), drawn with `label_seed` (defaults to `seed`).
    The same data and seed always give the same split.
    """
    n = len(data.x)
    rng = np.random.default_rng(seed)
    n_test = max(1, int(round(test_fraction * n)))
    n_val = int(round(val_fraction * n))
    if n - n_test - n_val < 1:
        raise SettingsError(f"Data spec {data.spec!r} has {n} examples, too few to split; expected at least 3.")
    order = _stratified_order(data.y, rng) if data.y is not None else rng.permutation(n)
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    labeled = np.sort(train) if data.y is None else _label_subset(
        train, data.y, label_fraction, np.random.default_rng(seed if label_seed is None else label_seed))
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test), labeled=labeled, seed=seed)


def pipeline(x: np.ndarray, y: np.ndarray | None = None, batch_size: int = 64,
             shuffle: bool = False, seed: int = 0):
    """A cached, batched, prefetched `tf.data.Dataset` of `x` (and `y`).

    `x` may also be an unbatched, already cached `tf.data.Dataset` (spilled features).
    """
    import tensorflow as tf

    if isinstance(x, tf.data.Dataset):
        ds = x if y is None else tf.data.Dataset.zip((x, tf.data.Dataset.from_tensor_slices(y)))
    else:
        ds = tf.data.Dataset.from_tensor_slices(x if y is None else (x, y)).cache()
    if shuffle:
        ds = ds.shuffle(len(x) if y is None else len(y), seed=seed, reshuffle_each_iteration=True)
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def _stratified_order(y: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A permutation in which every prefix holds the classes in their overall proportions."""
    keys = np.empty(len(y))
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        # spread each class evenly over [0, 1), with a random phase and order
        keys[rng.permutation(idx)] = (np.arange(len(idx)) + rng.random()) / len(idx)
    return np.lexsort((rng.random(len(y)), keys))


def _label_subset(train: np.ndarray, y: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    """round(fraction * len(train)) examples, shared among classes by largest remainder, at least one each."""
    classes, counts = np.unique(y[train], return_counts=True)
    wanted = fraction * counts
    take = np.maximum(1, np.floor(wanted)).astype(int)
    short = int(round(fraction * len(train))) - take.sum()
    if short > 0:
        take[np.argsort(-(wanted - np.floor(wanted)), kind="stable")[:short]] += 1
    take = np.minimum(take, counts)
    picked = [rng.permutation(train[y[train] == c])[:k] for c, k in zip(classes, take)]
    return np.sort(np.concatenate(picked))


def _load_digits(spec: str, arg: str, image_size: int | None) -> Data:
    digits = _digits()
    x = digits.images.astype("float32")[..., None]
    return Data(x=x, y=digits.target.astype("int64"), spec=spec,
                class_names=tuple(str(c) for c in digits.target_names), value_range=(0.0, 16.0))


@functools.lru_cache(maxsize=1)
def _digits():
    """scikit-learn's digits, read once per process (its CSV parse is most of a short run's data time)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    digits.images.setflags(write=False)
    digits.target.setflags(write=False)
    return digits


def _load_npz(spec: str, arg: str, image_size: int | None) -> Data:
    try:
        arrays = np.load(arg)
    except (OSError, ValueError) as err:
        raise SettingsError(f"Data file {arg!r} is not a readable .npz file: {err}.") from None
    if "x" not in arrays:
        raise SettingsError(f"Data file {arg!r} has arrays {sorted(arrays.files)}; expected one named 'x'.")
    x = np.asarray(arrays["x"], dtype="float32")
    if x.ndim not in (2, 3, 4):
        raise SettingsError(f"Array 'x' in {arg!r} has shape {x.shape}; expected (N, D), (N, H, W) or (N, H, W, C).")
    if x.ndim == 3:
        x = x[..., None]
    y = None
    if "y" in arrays:
        y = np.asarray(arrays["y"]).astype("int64").reshape(-1)
        if len(y) != len(x):
            raise SettingsError(f"Arrays in {arg!r} disagree: {len(x)} inputs but {len(y)} labels.")
    lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
    return Data(x=x, y=y, spec=spec, class_names=None, value_range=(lo, hi))


def _load_dir(spec: str, arg: str, image_size: int | None) -> Data:
    root = Path(arg)
    if not root.is_dir():
        raise SettingsError(f"Data path {arg!r} is not a folder; expected a folder of images.")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes:
        files = [(f, i) for i, c in enumerate(classes) for f in sorted((root / c).iterdir()) if _is_image(f)]
    else:
        files = [(f, -1) for f in sorted(root.iterdir()) if _is_image(f)]
    if not files:
        raise SettingsError(f"Folder {arg!r} holds no images; expected {', '.join(IMAGE_SUFFIXES)} files.")
    x = read_images([f for f, _ in files], image_size)
    y = np.array([i for _, i in files], dtype="int64") if classes else None
    return Data(x=x, y=y, spec=spec, class_names=tuple(classes) if classes else None, value_range=(0.0, 255.0))


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def read_images(paths: list[Path], image_size: int | tuple[int, int] | None = None,
                channels: int | None = None) -> np.ndarray:
    """Images as `(N, H, W, C)` float32 in 0..255, resized to `image_size` (side or (H, W)), else the first's.

    `channels` 1 or 3 converts to gray or RGB; by default gray only when every image is.
    """
    from PIL import Image

    images = []
    for p in paths:
        try:
            images.append(Image.open(p))
        except OSError as err:
            raise SettingsError(f"Image {str(p)!r} cannot be read: {err}.") from None
    gray = all(im.mode in ("L", "1", "I;16") for im in images) if channels is None else channels == 1
    if image_size is None:
        size = images[0].size
        other = next((im for im in images if im.size != size), None)
        if other is not None:
            raise SettingsError(
                f"Images differ in size ({size[0]}x{size[1]} and {other.size[0]}x{other.size[1]} in "
                f"{str(Path(other.filename).parent)!r}); pass --image-size N to resize them all."
            )
    else:
        height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
        size = (width, height)
    arrays = [np.asarray(im.convert("L" if gray else "RGB").resize(size), dtype="float32") for im in images]
    x = np.stack(arrays)
    return x[..., None] if gray else x


def _load_tfds(spec: str, arg: str, image_size: int | None) -> Data:
    name, _, split = arg.partition(":")
    import tensorflow_datasets as tfds

    _check_tfds_reachable(tfds, name)
    try:
        ds, info = tfds.load(name, split=split or "train", with_info=True, as_supervised=False)
    except Exception as err:  # tfds raises many kinds: unknown name, no network, bad split
        raise TransferkitError(f"tensorflow-datasets could not load {arg!r}: {str(err).splitlines()[0]}") from None
    image_key = next((k for k, f in info.features.items() if isinstance(f, tfds.features.Image)), None)
    label_key = next((k for k, f in info.features.items() if isinstance(f, tfds.features.ClassLabel)), None)
    if image_key is None:
        raise SettingsError(f"Dataset {name!r} has no image feature; expected one of type tfds.features.Image.")
    xs, ys = [], []
    for example in tfds.as_numpy(ds):
        xs.append(example[image_key])
        if label_key is not None:
            ys.append(example[label_key])
    x = np.stack(xs).astype("float32")
    if image_size:
        import tensorflow as tf

        x = tf.image.resize(x, (image_size, image_size)).numpy()
    y = np.asarray(ys, dtype="int64") if label_key is not None else None
    names = tuple(info.features[label_key].names) if label_key is not None else None
    return Data(x=x, y=y, spec=spec, class_names=names, value_range=(0.0, 255.0))


def _check_tfds_reachable(tfds, name: str, timeout: float = 3.0) -> None:
    """Fail in seconds, not minutes of retries, when `name` is not prepared here and there is no network."""
    import socket

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
