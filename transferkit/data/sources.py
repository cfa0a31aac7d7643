"""Data specs and the seeded train / validation / test split; their tf.data pipelines are in `pipelines`.

A data spec is a string: `digits` (scikit-learn's bundled 8x8 digits, the
default), `npz:PATH` (arrays `x` and optional `y`), `dir:PATH` (an image folder:
one sub-folder per class, or images alone for unlabeled data) or
`tfds:NAME[:SPLIT]` (tensorflow-datasets). How image files are decoded, given
one channel count and one size: `transferkit.data.images`.

Example:

>>> from transferkit.data.sources import load_data, split_data
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
import sys
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import SettingsError
from transferkit.data.image_files import ImageFiles
from transferkit.data.image_listing import IMAGE_SUFFIXES, Listing, list_images
from transferkit.data.image_size import LONGEST_SIDE
from transferkit.data.images import Checked, check_images
from transferkit.data.images import read_images  # noqa: F401 - part of this module's interface (prediction uses it)
from transferkit.data.pipelines import as_array, batches_of, pipeline, rows_of  # noqa: F401 - part of this module's interface
from transferkit.data.progress import showing
from transferkit.recipe import RESIZE_MODES, Recipe

SCHEMES = ("digits", "npz", "dir", "tfds")
_CHUNK_BYTES = 1 << 26  # rows read at a time when hashing or checking large (memory-mapped) inputs


@dataclasses.dataclass(frozen=True)
class Data:
    """Inputs, optional integer labels, and what is known about them.

    `x` is an array (digits, npz: memory-mapped where it can be, tfds), or for
    `dir:` an `ImageFiles`: the file list, decoded batch by batch in `pipeline`.
    `skipped` names the files left out because they could not be decoded (`dir:` with `skip_bad_files`).
    """

    x: np.ndarray | ImageFiles
    y: np.ndarray | None
    spec: str
    class_names: tuple[str, ...] | None
    value_range: tuple[float, float]
    skipped: tuple[str, ...] = ()

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
        """A short hash of the inputs and labels: the same data gives the same fingerprint.

        Arrays: their bytes. Image folders: each file's name (relative to the
        folder), byte size and modification time, and the size, channels and
        resize mode they are read with; no file is read.
        """
        h = hashlib.sha256()
        if isinstance(self.x, ImageFiles):
            self.x.fingerprint_into(h)
        for rows in ([] if isinstance(self.x, ImageFiles) else _row_chunks(self.x)):  # the bytes of the whole array, without a copy of it
            h.update(np.ascontiguousarray(rows).tobytes())
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


@dataclasses.dataclass(frozen=True)
class _Options:
    image_size: int | tuple[int, int] | None = None
    resize: str = "stretch"
    skip_bad_files: bool = False
    verbose: bool = True


def load_data(spec: str = "digits", image_size: int | tuple[int, int] | None = None, resize: str = "stretch",
              skip_bad_files: bool = False, verbose: bool = True) -> Data:
    """Load a data spec into arrays. Images are `(N, H, W, C)` float32; vectors `(N, D)`.

    Args:
        spec: String. A data spec (see the module docstring). Defaults to `"digits"`.
        image_size: Optional integer, or `(height, width)`. Resize `dir:` and `tfds:` images to this size.
            `dir:` images of mixed sizes default to the median size.
        resize: String. How an image of another aspect ratio reaches the size: `"stretch"`,
            `"crop"` (the center) or `"pad"` (with zeros). Defaults to `"stretch"`.
        skip_bad_files: Boolean. Leave out `dir:` files that cannot be decoded (listed in
            `Data.skipped`) instead of refusing the folder. Defaults to `False`.
        verbose: Boolean. Print the `dir:` summary line and a progress bar on stderr. Defaults to `True`.

    Raises:
        SettingsError: an unknown scheme, a missing path, an empty folder, a file that cannot be
            decoded, arrays without `x`, labels that are not class numbers or names.
    """
    if resize not in RESIZE_MODES:
        raise SettingsError(f"resize must be one of {', '.join(RESIZE_MODES)}. Received: resize={resize!r}")
    scheme, arg = parse_spec(spec)
    loader = {"digits": _load_digits, "npz": _load_npz, "dir": _load_dir, "tfds": _load_tfds}[scheme]
    data = loader(spec, arg, _Options(image_size, resize, skip_bad_files, verbose))
    if len(data.x) == 0:
        raise SettingsError(f"Data spec {spec!r} holds no examples; expected at least one.")
    # decoded images hold levels 0..255: only arrays can hold NaN
    bad = 0 if isinstance(data.x, ImageFiles) else sum(
        int(np.size(rows) - np.count_nonzero(np.isfinite(rows))) for rows in _row_chunks(data.x))
    if bad:
        raise SettingsError(f"Data {spec!r} has {bad} NaN or infinite input values; expected finite numbers.")
    if data.y is not None and data.y.min() < 0:
        raise SettingsError(f"Data {spec!r} has label {int(data.y.min())}; expected class numbers 0, 1, 2, ...")
    return data


def load_recipe_data(recipe: Recipe, image_size: tuple[int, int] | None = None, skip_bad_files: bool = False) -> Data:
    """The recipe's data, read with its image size, resize mode and bad-file policy.

    `image_size` and `skip_bad_files` are what the base asks for (a saved
    encoder's size and pretraining's policy), used where the recipe sets neither.
    """
    return load_data(recipe.data, image_size=recipe.image_size or image_size, resize=recipe.resize,
                     skip_bad_files=recipe.skip_bad_files or skip_bad_files)


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
    if data.y is not None:
        _require_each_class_in(train, data, test_fraction, val_fraction)
    labeled = np.sort(train) if data.y is None else _label_subset(
        train, data.y, label_fraction, np.random.default_rng(seed if label_seed is None else label_seed))
    return Split(train=np.sort(train), val=np.sort(val), test=np.sort(test), labeled=labeled, seed=seed)


def require_labels(data: Data) -> None:
    """Refuse data without labels, or with a single class: a classifier needs two classes to tell apart."""
    if data.y is None:
        raise SettingsError(f"Data {data.spec!r} has no labels; fine-tuning needs labeled data "
                            "(a folder with one sub-folder per class, or an npz with 'y').")
    require_classes(data, 2)


def require_classes(data: Data, minimum: int = 2) -> None:
    """Refuse data whose labels hold fewer than `minimum` classes (a classifier needs two to tell apart).

    Raises:
        SettingsError: data without labels, or with fewer classes than `minimum`.
    """
    if data.y is None:
        raise SettingsError(f"Data {data.spec!r} has no labels; expected labels of at least {minimum} classes.")
    present = np.unique(data.y)
    if len(present) < minimum:
        names = ", ".join(repr(_class_name(data, c)) for c in present)
        raise SettingsError(f"Data {data.spec!r} has {len(present)} class{'' if len(present) == 1 else 'es'} "
                            f"({names}); expected at least {minimum} classes to train a classifier.")


def _require_each_class_in(train: np.ndarray, data: Data, test_fraction: float, val_fraction: float) -> None:
    """Refuse a split that leaves a class without training examples: nothing could learn it."""
    total = np.bincount(data.y, minlength=data.num_classes)
    in_train = np.bincount(data.y[train], minlength=len(total))
    missing = np.flatnonzero((total > 0) & (in_train == 0))
    if len(missing):
        c = int(missing[0])
        enough = int(1 / (1 - test_fraction - val_fraction)) + 1
        raise SettingsError(
            f"Class {_class_name(data, c)!r} of {data.spec!r} has {total[c]} example(s), all in the test or "
            f"validation part (test_fraction={test_fraction}, val_fraction={val_fraction}); expected at least one "
            f"in training: give each class {enough} or more examples, or choose another split seed."
        )


def _class_name(data: Data, label: int) -> str:
    return data.class_names[label] if data.class_names else str(int(label))


def _row_chunks(x: np.ndarray):
    """Consecutive blocks of rows of about 64 MB: a memory-mapped array is read once, never copied whole."""
    rows = max(1, _CHUNK_BYTES // max(1, x[:1].nbytes))
    for start in range(0, len(x), rows):
        yield x[start:start + rows]


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


def _load_digits(spec: str, arg: str, options: _Options) -> Data:
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


def _load_npz(spec: str, arg: str, options: _Options) -> Data:
    from transferkit.data.npz_source import load_npz

    x, y, class_names = load_npz(arg)
    lo, hi = (float(x.min()), float(x.max())) if len(x) else (0.0, 1.0)
    return Data(x=x, y=y, spec=spec, class_names=class_names, value_range=(lo, hi))


def _load_dir(spec: str, arg: str, options: _Options) -> Data:
    root = Path(arg)
    if not root.is_dir():
        raise SettingsError(f"Data path {arg!r} is not a folder; expected a folder of images.")
    listing = list_images(root)
    if not listing.files:
        raise SettingsError(f"Folder {arg!r} holds no images; expected {', '.join(IMAGE_SUFFIXES)} files.")
    checked = check_images(listing.files, options.image_size, resize=options.resize,
                           skip_bad_files=options.skip_bad_files, progress=options.verbose)
    y = None if listing.labels is None else np.asarray(listing.labels, dtype="int64")[checked.kept]
    if y is not None:
        empty = np.flatnonzero(np.bincount(y, minlength=len(listing.class_names)) == 0)
        if len(empty):
            raise SettingsError(f"Class folder {str(root / listing.class_names[empty[0]])!r} holds no image that "
                                "can be read; expected at least one per class (or remove the folder).")
    if showing(options.verbose):
        print(_summary(spec, root, listing, checked), file=sys.stderr, flush=True)
    x = ImageFiles([listing.files[i] for i in checked.kept], checked.size, checked.channels, options.resize, root=root,
                   plain=checked.plain)
    return Data(x=x, y=y, spec=spec, class_names=listing.class_names, value_range=(0.0, 255.0),
                skipped=tuple(path for path, _ in checked.bad))


def _summary(spec: str, root: Path, listing: Listing, checked: Checked) -> str:
    """`dir:PATH: N images, K classes, S skipped (H hidden, O non-image, B bad): first bad files`; the size chosen."""
    classes = f"{len(listing.class_names)} classes" if listing.class_names else "unlabeled"
    parts = [f"{listing.hidden} hidden", f"{listing.non_image} non-image", f"{len(checked.bad)} bad"]
    if listing.outside:
        parts.append(f"{listing.outside} beside the class folders")
    skipped = listing.hidden + listing.non_image + listing.outside + len(checked.bad)
    line = f"{spec}: {len(checked.kept)} images, {classes}, {skipped} skipped ({', '.join(parts)})"
    if checked.bad:
        line += ": " + ", ".join(Path(path).relative_to(root).as_posix() for path, _ in checked.bad[:3])
        line += ", ..." if len(checked.bad) > 3 else ""
    if checked.resized_to_median or checked.scaled_from:
        chosen = "the median size" if checked.resized_to_median else "their size"
        if checked.scaled_from:
            chosen += (f" {checked.scaled_from[0]}x{checked.scaled_from[1]} scaled to {LONGEST_SIDE} on its longer "
                       "side; --image-size N to choose")
        line += (f"; {'sizes differ, ' if checked.resized_to_median else ''}all resized to "
                 f"{checked.size[0]}x{checked.size[1]} (height x width: {chosen})")
    return line


def _load_tfds(spec: str, arg: str, options: _Options) -> Data:
    from transferkit.data.tfds_source import load_tfds

    x, y, class_names = load_tfds(arg, options.image_size, options.resize)
    return Data(x=x, y=y, spec=spec, class_names=class_names, value_range=(0.0, 255.0))
