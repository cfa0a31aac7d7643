"""An artifact's `manifest.json`, typed: what the artifact is, how it was made and what loading it needs.

`Manifest.from_json` takes the decoded JSON and checks the type of every key it
knows; `to_json` gives back the same keys and values, so a manifest read and
written again is unchanged. Keys that every version of transferkit wrote are
required. Keys added later take their documented default when an older file
lacks them; they are listed in `absent` and not written back. Keys this version
does not know are kept in `extra` and written back as they were. An encoder
carries the encoder fields and a classifier the classifier fields; the other
kind's fields keep their defaults and are not written.

Example:

>>> manifest = Manifest.from_json({
...     "kind": "encoder", "format": 1, "created": "2026-11-27T10:00:00+00:00", "input_shape": [64],
...     "input_dtype": "float32", "image_size": None, "value_range": [0.0, 16.0],
...     "data": {"spec": "digits", "fingerprint": "ab12", "num_examples": 1797, "class_names": None},
...     "split": {"seed": 0, "test_fraction": 0.2, "val_fraction": 0.1, "label_fraction": 1.0,
...               "sizes": {"train": 1258, "val": 180, "test": 359, "labeled": 1258}},
...     "versions": {"keras": "3.6.0"}, "task": "denoising", "arch": "64", "activation": "selu",
...     "normalization": {"mean": [4.9], "variance": [36.1]}, "output_shape": [64], "metrics": {"loss": 0.4},
...     "notes": "kept"})
>>> manifest.data.spec, manifest.resize, sorted(manifest.absent), manifest.extra
('digits', 'stretch', ['exports', 'pictures', 'resize', 'stages'], {'notes': 'kept'})
>>> "resize" in manifest.to_json(), manifest.to_json()["notes"]
(False, 'kept')
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import types
import typing
from typing import Any, ClassVar, Self

from transferkit.errors import TransferkitError

@dataclasses.dataclass
class Record:
    """What every part of a manifest shares: reading it from JSON with checked types, and writing it back.

    A subclass's fields are the keys it knows; a field without a default is
    required. Known keys the JSON lacked take their defaults and are listed in
    `absent`; unknown keys are kept in `extra`. `to_json` writes the known keys
    not in `absent`, and `extra`.

    Raises:
        TransferkitError: `from_json` on a value that is not an object, lacks a
            required key or holds a key of the wrong type (one line naming the
            file and the key).
    """

    extra: dict[str, Any] = dataclasses.field(default_factory=dict, kw_only=True)  # unknown keys, kept as read
    absent: frozenset[str] = dataclasses.field(default_factory=frozenset, kw_only=True)  # known keys the JSON lacked

    @classmethod
    def from_json(cls, value: Any, source: str = "manifest.json", where: str = "") -> Self:
        """The record of `value` (decoded JSON); `source` names the file and `where` the path to it in errors."""
        if not isinstance(value, dict):
            raise _refuse(source, where.rstrip(".") or "the manifest", "a JSON object", value)
        hints = _hints(cls)
        known, required = cls.known_keys(value), cls.required_keys(value)
        loaded, absent = {}, set()
        for name in known:
            if name in value:
                loaded[name] = _check(value[name], hints[name], source, where + name)
            elif name in required:
                raise TransferkitError(f"{source!r} is not a transferkit manifest: it has no {where + name!r}.")
            else:
                absent.add(name)
        return cls(**loaded, extra={k: v for k, v in value.items() if k not in known}, absent=frozenset(absent))

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready copy: the known keys not `absent` (records as dicts), and `extra`."""
        written = {name: getattr(self, name) for name in self.written_keys()}
        return copy.deepcopy({**self.extra, **{k: v.to_json() if isinstance(v, Record) else v
                                               for k, v in written.items()}})

    @classmethod
    def known_keys(cls, value: dict[str, Any]) -> tuple[str, ...]:
        """The keys read from `value` into fields; every other key goes to `extra`."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name not in ("extra", "absent"))

    @classmethod
    def required_keys(cls, value: dict[str, Any]) -> tuple[str, ...]:
        """The known keys `value` must have: the fields without a default."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)

    def written_keys(self) -> tuple[str, ...]:
        """The known keys `to_json` writes: those not `absent`."""
        return tuple(name for name in self.known_keys({}) if name not in self.absent)


@dataclasses.dataclass
class DataRecord(Record):
    """What a manifest records of the data the artifact was trained on (`manifest.data`)."""

    spec: str  # the data spec, e.g. "digits" or "dir:photos"
    fingerprint: str  # a hash of the inputs and labels: the same data has the same one
    num_examples: int  # examples in the data, all splits together
    class_names: list[str] | None  # the class names in label order; None: the data has none
    skipped: list[str] = dataclasses.field(default_factory=list)  # unreadable image files left out; older: []


@dataclasses.dataclass
class SplitRecord(Record):
    """What a manifest records of the train / validation / test split (`manifest.split`)."""

    seed: int  # the split's seed: the same data and seed give the same split
    test_fraction: float  # fraction of the examples held out for the test
    val_fraction: float  # fraction of the examples held out for validation
    label_fraction: float  # fraction of the training examples whose labels were kept
    sizes: dict[str, int]  # examples in "train", "val", "test" and "labeled"


@dataclasses.dataclass
class BaseRecord(Record):
    """What a classifier's manifest records of its base (`manifest.base`); `extra` holds what its kind adds.

    The kind says where the base came from: `encoder` (a pretrained artifact),
    `backbone` (Keras Applications), `file` (a model file) or `hub` (keras-hub).
    """

    kind: str  # "encoder", "backbone", "file" or "hub"
    description: str  # the base in words, as the run printed it
    requires: list[dict[str, str]] = dataclasses.field(default_factory=list)  # packages loading needs (hub only)


@dataclasses.dataclass
class Manifest(Record):
    """The manifest of an artifact folder: every key `manifest.json` carries, typed.

    The JSON keys are the field names. Every artifact has the common fields
    (`kind` to `resize`); an encoder adds `task`, `arch`, `activation`,
    `normalization`, `output_shape`, `pictures`, `stages` and `metrics`; a
    classifier adds `num_classes`, `base`, `blocks`, `stages`,
    `semi_supervised`, `augment`, `mixup`, `cutmix`, `class_weight`, `ema` and
    `metrics`; `exports` appears once the artifact is exported. The comment on
    each field says what it holds and, for a key added after the first
    version, the default an older file loads with.

    Example:

    >>> from transferkit.store.artifacts import read_manifest
    >>> manifest = read_manifest("saved_models/digits-classifier")   # doctest: +SKIP
    >>> manifest.kind, manifest.num_classes, manifest.data.spec      # doctest: +SKIP
    ('classifier', 10, 'digits')
    >>> manifest.to_json()["data"]["spec"]                           # doctest: +SKIP
    'digits'

    Raises:
        TransferkitError: `from_json` on JSON that is not a transferkit
            manifest: not an object, a required key missing, or a key of the
            wrong type (one line naming the file and the key).
    """

    COMMON: ClassVar[tuple[str, ...]] = ("kind", "format", "created", "input_shape", "input_dtype", "image_size",
                                         "value_range", "data", "split", "versions", "resize")
    OF_KIND: ClassVar[dict[str, tuple[str, ...]]] = {  # the keys each kind adds
        "encoder": ("task", "arch", "activation", "normalization", "output_shape", "pictures", "stages", "metrics"),
        "classifier": ("num_classes", "base", "blocks", "stages", "semi_supervised", "augment", "mixup", "cutmix",
                       "class_weight", "ema", "metrics")}
    REQUIRED: ClassVar[dict[str, tuple[str, ...]]] = {  # what each kind has carried since the first version
        "encoder": ("task", "arch", "activation", "normalization", "output_shape", "metrics"),
        "classifier": ("num_classes", "base", "blocks", "stages", "metrics")}

    kind: str  # "encoder" or "classifier"
    format: int  # the artifact folder's layout version (`artifacts.FORMAT`)
    created: str  # when it was saved: ISO 8601, UTC, to the second
    input_shape: list[int]  # one input's shape, without the batch axis
    input_dtype: str  # the inputs' dtype: "float32"
    image_size: int | None  # the side images were resized to; None: as read
    value_range: list[float]  # [low, high] of the raw inputs
    data: DataRecord  # the data trained on
    split: SplitRecord  # how it was split
    versions: dict[str, str]  # python, transferkit, tensorflow, keras, numpy, and the Keras backend
    resize: str = "stretch"  # how images were brought to `image_size`; older: "stretch"
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)  # final metrics (both kinds)
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # the stages trained; older encoders: []
    # encoders only
    task: str | None = None  # the pretraining task, e.g. "denoising"
    arch: str | None = None  # the encoder's layer sizes, as given
    activation: str | None = None  # the encoder's activation (its setup: initializer, dropout kind)
    normalization: dict[str, list[float]] | None = None  # per-channel "mean" and "variance" of the training inputs
    output_shape: list[int | None] | None = None  # one output's shape, without the batch axis
    pictures: list[str] = dataclasses.field(default_factory=list)  # PNG files in the folder; older: []
    # classifiers only
    num_classes: int | None = None  # the number of classes
    base: BaseRecord | None = None  # the base the head sits on
    blocks: list[str] = dataclasses.field(default_factory=list)  # the base's blocks, bottom to top
    semi_supervised: dict[str, Any] = dataclasses.field(  # the unlabeled data learned from; older: {"mode": "none"}
        default_factory=lambda: {"mode": "none"})
    augment: str = "none"  # the augmentation spec; older: "none"
    mixup: float = 0.0  # MixUp's alpha (0: off); older: 0.0
    cutmix: float = 0.0  # CutMix's factor (0: off); older: 0.0
    class_weight: dict[str, Any] = dataclasses.field(  # the setting and each class's weight by name
        default_factory=lambda: {"setting": "none", "weights": None})  # older: no weights
    ema: float | None = None  # the weight averaging's decay; None (and older): off
    # both, once exported
    exports: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # format -> path and check; {}: none

    @property
    def input_size(self) -> tuple[int, int] | None:
        """The height and width the model takes, for image inputs `(height, width, channels)`; else None."""
        return (self.input_shape[0], self.input_shape[1]) if len(self.input_shape) == 3 else None

    @classmethod
    def known_keys(cls, value: dict[str, Any]) -> tuple[str, ...]:
        """The common keys, those of the kind `value` names, and `exports` (an unknown kind's keys go to `extra`)."""
        return (*cls.COMMON, *cls.OF_KIND.get(_kind(value), ()), "exports")

    @classmethod
    def required_keys(cls, value: dict[str, Any]) -> tuple[str, ...]:
        """The fields without a default, and those the kind `value` names has carried since the first version."""
        return (*super().required_keys(value), *cls.REQUIRED.get(_kind(value), ()))

    def written_keys(self) -> tuple[str, ...]:
        """The keys of its kind not `absent`; `exports` once there is one (absent or not when read)."""
        kept = tuple(name for name in self.known_keys({"kind": self.kind}) if name not in (*self.absent, "exports"))
        return (*kept, "exports") if self.exports else kept


def _kind(value: dict[str, Any]) -> str | None:
    kind = value.get("kind")
    return kind if isinstance(kind, str) else None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check(value: Any, hint: Any, source: str, key: str) -> Any:
    """`value` if it is of type `hint` (a `Record` type: the record read from it); else `TransferkitError`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if isinstance(hint, type) and issubclass(hint, Record):
        return hint.from_json(value, source, f"{key}.")
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        (inner,) = [arg for arg in args if arg is not type(None)]
        return _check(value, inner, source, key)
    if origin is list and isinstance(value, list):
        return [_check(item, args[0], source, f"{key}[{i}]") for i, item in enumerate(value)]
    if origin is dict and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {k: _check(item, args[1], source, f"{key}.{k}") for k, item in value.items()}
    if hint is float:
        fits = isinstance(value, (int, float)) and not isinstance(value, bool)  # a whole number is a float too: (0, 255)
    elif hint is int:
        fits = isinstance(value, int) and not isinstance(value, bool)
    else:
        fits = origin is None and isinstance(value, hint)
    if fits:
        return value
    raise _refuse(source, key, hint.__name__ if isinstance(hint, type) else str(hint), value)


def _refuse(source: str, key: str, expected: str, value: Any) -> TransferkitError:
    """The one-line error for `key` of `source` holding `value` where `expected` belongs."""
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return TransferkitError(f"{source!r} is not a transferkit manifest: {key!r} should be {expected}. "
                            f"Received: {key}={shown}")
