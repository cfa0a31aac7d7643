"""The Recipe: every setting of a transferkit run, in one place.

A TOML file in `recipes/`, Python keyword arguments and CLI flags are three
ways to write the same Recipe. This module does not import TensorFlow.

Example:

>>> from transferkit.recipe import Recipe
>>> r = Recipe().replace(label_fraction=0.05, unfreeze_top=2)
>>> r.label_fraction, r.unfreeze_top
(0.05, 2)
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

from transferkit.pieces.augment_spec import parse_augment
from transferkit.finetuning.class_weights import check_class_weight_setting
from transferkit.errors import SettingsError
from transferkit.training.runtime import DEVICES, PRECISIONS, STRATEGIES

TASKS = ("autoencoder", "denoising", "stacked", "rotation", "pairs", "gan")
NOISE_KINDS = ("gaussian", "dropout")
SEMI_SUPERVISED = ("none", "pseudo", "propagate")
GRAPHS = ("features", "inputs")  # what propagate's kNN graph is built on
SCHEDULES = ("onecycle", "constant", "power", "exponential", "piecewise", "plateau")
ARCHS = ("dense", "conv")
BATCHNORM = ("none", "before", "after")
COMMANDS = ("pretrain", "finetune")
RESIZE_MODES = ("stretch", "crop", "pad")  # keras.layers.Resizing: stretch, crop_ or pad_to_aspect_ratio
PREPROCESS = ("none", "scale:1/255", "tf", "imagenet-caffe", "imagenet-torch")  # --base: see transferkit.finetuning.bases


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of `pretrain` and `finetune`, with the defaults of the demo.

    Field names are the CLI flags with `-` written `_` (`--label-fraction` is
    `label_fraction`); `--from` is `from_` because `from` is a Python keyword
    (the TOML key is `from`).
    """

    # data and split
    data: str = "digits"
    seed: int = 0
    split_seed: int | None = None
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    label_fraction: float = 1.0
    image_size: int | None = None
    resize: str = "stretch"
    skip_bad_files: bool = False
    # training
    epochs: int | None = None  # None: from a step budget (transferkit.training.defaults)
    batch_size: int = 32
    lr: float | str | None = None  # None: 1e-2 to fine-tune, 1e-3 to pretrain (2e-4 for gan)
    patience: int = 20
    optimizer: str = "nadam"
    schedule: str = "onecycle"
    plateau_factor: float = 0.1
    plateau_patience: int = 10
    activation: str = "selu"
    batchnorm: str = "none"
    dropout: float = 0.0
    mc_dropout: bool = False
    max_norm: float | None = None
    clipnorm: float | None = None
    clipvalue: float | None = None
    # pretrain
    task: str = "denoising"
    arch: str = "dense"
    units: tuple[int, ...] = (128, 64, 32)
    filters: tuple[int, ...] = (16, 32, 32)
    noise: float = 0.3
    noise_kind: str = "gaussian"
    tied_weights: bool = False
    # finetune
    from_: str | None = None
    backbone: str | None = None
    weights: str = "none"
    base: str | None = None  # a Keras model file
    cut: str | None = None  # None: before the base's classifier (transferkit.finetuning.bases)
    preprocess: str | None = None  # None: none (the base takes 0..255 pixels)
    head_epochs: int | None = None  # None: from a step budget
    head_patience: int | None = None  # the older name of `patience`, for head-only stages
    unfreeze_top: int | None = None  # None: every block of the base
    unfreeze_schedule: str | None = None
    gradual: bool = False
    finetune_lr_factor: float | None = None  # None: 0.1 on an encoder, 0.01 on a backbone
    label_smoothing: float = 0.0
    augment: str = "none"  # random image augmentation inside the model, in training only (transferkit.pieces.augment_spec)
    mixup: float = 0.0  # MixUp's alpha (0: off)
    cutmix: float = 0.0  # CutMix's factor (0: off)
    class_weight: str = "none"  # none, balanced, or a JSON file of class name -> weight
    ema: float | None = None  # decay of an exponential moving average of the weights (None: off)
    lr_decay: float = 1.0
    train_batchnorm: bool = False
    cache_features: bool = True
    semi_supervised: str = "none"
    pseudo_rounds: int = 5
    pseudo_threshold: float | None = None
    propagate_on: str = "features"
    # where it runs
    device: str = "auto"
    strategy: str = "auto"
    precision: str = "float32"
    jit_compile: bool = False
    # training health
    health_every: int = 0
    tensorboard: str | None = None
    # resume after a crash
    backup_every: int | None = None
    restart: bool = False
    # output
    out: str | None = None
    name: str | None = None

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with `overrides` applied; `None` values leave a field as it is."""
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise SettingsError(
                f"Unknown setting {unknown[0]!r}; expected one of {', '.join(field_names())}."
            )
        given = {k: _coerce(k, v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given).validate()

    def validate(self) -> "Recipe":
        """Check every value; raise `SettingsError` naming the first bad one."""
        _check(0 < self.label_fraction <= 1, "label_fraction", self.label_fraction, "a number in (0, 1]")
        _check(0 < self.test_fraction < 1, "test_fraction", self.test_fraction, "a number in (0, 1)")
        _check(0 <= self.val_fraction < 1, "val_fraction", self.val_fraction, "a number in [0, 1)")
        _check(self.test_fraction + self.val_fraction < 1, "val_fraction", self.val_fraction,
               f"val_fraction + test_fraction < 1 (test_fraction={self.test_fraction})")
        _check(0 <= self.dropout < 1, "dropout", self.dropout, "a number in [0, 1)")
        _check(0 <= self.noise <= 1, "noise", self.noise, "a number in [0, 1] (a fraction of the data's std)")
        _check(self.lr is None or self.lr == "auto" or (not isinstance(self.lr, str) and 0 < self.lr < math.inf),
               "lr", self.lr, "a positive number or auto")
        _check(self.schedule in SCHEDULES, "schedule", self.schedule, f"one of {', '.join(SCHEDULES)}")
        _check(0 < self.plateau_factor < 1, "plateau_factor", self.plateau_factor, "a number in (0, 1)")
        _check(self.plateau_patience >= 0, "plateau_patience", self.plateau_patience, "an integer >= 0")
        for key, choices in (("device", DEVICES), ("strategy", STRATEGIES), ("precision", PRECISIONS)):
            _check(getattr(self, key) in choices, key, getattr(self, key), f"one of {', '.join(choices)}")
        _check(self.noise_kind in NOISE_KINDS, "noise_kind", self.noise_kind, f"one of {', '.join(NOISE_KINDS)}")
        _check(self.health_every >= 0, "health_every", self.health_every, "an integer >= 0 (0: off)")
        _check(self.backup_every is None or self.backup_every >= 1, "backup_every", self.backup_every,
               "an integer >= 1")
        for key in ("max_norm", "clipnorm", "clipvalue"):
            value = getattr(self, key)
            _check(value is None or value > 0, key, value, "a positive number")
        _check(self.lr_decay >= 1, "lr_decay", self.lr_decay, "a number >= 1 (ULMFiT uses 2.6)")
        _check(not (self.gradual and self.unfreeze_schedule), "gradual", self.gradual,
               "either --gradual or --unfreeze-schedule, not both")
        _check(self.semi_supervised in SEMI_SUPERVISED, "semi_supervised", self.semi_supervised,
               f"one of {', '.join(SEMI_SUPERVISED)}")
        _check(self.propagate_on in GRAPHS, "propagate_on", self.propagate_on, f"one of {', '.join(GRAPHS)}")
        _check(self.pseudo_rounds >= 1, "pseudo_rounds", self.pseudo_rounds, "an integer >= 1")
        _check(self.pseudo_threshold is None or 0 < self.pseudo_threshold < 1, "pseudo_threshold",
               self.pseudo_threshold, "a number in (0, 1)")
        _check(0 <= self.label_smoothing < 1, "label_smoothing", self.label_smoothing, "a number in [0, 1)")
        parse_augment(self.augment)
        _check(0 <= self.mixup < math.inf, "mixup", self.mixup, "a number >= 0 (MixUp's alpha; 0: off)")
        _check(0 <= self.cutmix <= 1, "cutmix", self.cutmix, "a number in [0, 1] (CutMix's factor; 0: off)")
        check_class_weight_setting(self.class_weight)
        _check(self.ema is None or 0 < self.ema < 1, "ema", self.ema,
               "a number in (0, 1), the decay of the weights' moving average (0.999 is common)")
        _check(self.finetune_lr_factor is None or self.finetune_lr_factor > 0, "finetune_lr_factor",
               self.finetune_lr_factor, "a positive number")
        _check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
        for key in ("epochs", "head_epochs", "patience", "head_patience", "unfreeze_top"):
            value = getattr(self, key)
            _check(value is None or value >= 0, key, value, "an integer >= 0")
        _check(self.image_size is None or self.image_size >= 1, "image_size", self.image_size, "an integer >= 1")
        _check(self.resize in RESIZE_MODES, "resize", self.resize, f"one of {', '.join(RESIZE_MODES)}")
        _check(self.task in TASKS, "task", self.task, f"one of {', '.join(TASKS)}")
        _check(self.arch in ARCHS, "arch", self.arch, f"one of {', '.join(ARCHS)}")
        _check(self.batchnorm in BATCHNORM, "batchnorm", self.batchnorm, f"one of {', '.join(BATCHNORM)}")
        _check(all(u >= 1 for u in self.units) and self.units, "units", self.units, "positive integers")
        _check(all(f >= 1 for f in self.filters) and self.filters, "filters", self.filters, "positive integers")
        bases = {flag: value for flag, value in (("from", self.from_), ("backbone", self.backbone),
                                                 ("base", self.base)) if value}
        if len(bases) > 1:
            raise SettingsError("The base must be exactly one of --from, --backbone, --base. Received: "
                                + ", ".join(f"{flag}={value!r}" for flag, value in bases.items()))
        _check(self.cut is None or self.base, "cut", self.cut, "given with --base FILE")
        _check(self.cut is None or not str(self.cut).lstrip("+").isdigit(), "cut", self.cut,
               "a layer name or a negative index")
        _check(self.preprocess is None or self.base, "preprocess", self.preprocess, "given with --base FILE")
        _check(self.preprocess is None or self.preprocess in PREPROCESS, "preprocess", self.preprocess,
               f"one of {', '.join(PREPROCESS)}")
        return self

    @property
    def mixes(self) -> bool:
        """Whether training batches are mixed (MixUp or CutMix): the targets are then probabilities."""
        return bool(self.mixup or self.cutmix)

    @property
    def health_steps(self) -> int:
        """Steps between training-health checks: `health_every`, else 50 with `tensorboard`, else 0 (off)."""
        return self.health_every or (50 if self.tensorboard else 0)

    @property
    def head_stage_patience(self) -> int:
        """Patience of head-only stages: `head_patience` where given (its older name), else `patience`."""
        return self.patience if self.head_patience is None else self.head_patience

    @property
    def resolved_split_seed(self) -> int:
        """The seed of the train/validation/test split: `split_seed`, else `seed`."""
        return self.seed if self.split_seed is None else self.split_seed

    def run_settings(self) -> dict[str, Any]:
        """The settings that make a run what it is: a backup continues only a run with the same ones."""
        return {k: v for k, v in self.to_dict().items()
                if k not in ("restart", "backup_every", "device", "health_every", "tensorboard")}

    def to_dict(self) -> dict[str, Any]:
        """The recipe as TOML-ready data (`from_` written `from`, `None` left out)."""
        out = {}
        for key, value in dataclasses.asdict(self).items():
            if value is not None:
                out[_toml_key(key)] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "Recipe":
        return cls().replace(**{_field_key(k): v for k, v in values.items()})

    @classmethod
    def load(cls, path: str | Path, command: str | None = None) -> "Recipe":
        """Read a recipe TOML file: top-level keys, then the `[command]` table over them."""
        path = Path(path)
        if not path.is_file():
            raise SettingsError(f"Recipe file {str(path)!r} does not exist; expected a TOML file.")
        try:
            doc = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise SettingsError(f"Recipe file {str(path)!r} is not valid TOML: {err}.") from None
        values = {k: v for k, v in doc.items() if not isinstance(v, dict)}
        tables = {k for k, v in doc.items() if isinstance(v, dict)}
        unknown = sorted(tables - set(COMMANDS))
        if unknown:
            raise SettingsError(
                f"Recipe file {str(path)!r} has a table [{unknown[0]}]; expected only {', '.join(COMMANDS)}."
            )
        if command is not None:
            values.update(doc.get(command, {}))
        return cls.from_dict(values)


def dump_toml(values: dict[str, Any]) -> str:
    """Write flat TOML for the recipe's value types (str, int, float, bool, lists)."""

    def fmt(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, (int, float)):
            return repr(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "".join(f"{k} = {fmt(v)}\n" for k, v in values.items())


def field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(Recipe)]


def _toml_key(field: str) -> str:
    return "from" if field == "from_" else field


def _field_key(key: str) -> str:
    return "from_" if key == "from" else key.replace("-", "_")


def _coerce(key: str, value: Any) -> Any:
    """Lists from TOML become tuples; ints where floats are expected stay numbers."""
    if key in ("units", "filters"):
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise SettingsError(f"{key} must be integers such as 128,64; Received: {key}={value!r}") from None
    if key == "cut" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == "batchnorm" and value in (False, None):
        return "none"
    if key == "lr" and isinstance(value, str) and value != "auto":
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"lr must be a positive number or auto. Received: lr={value!r}") from None
    return value


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{key} must be {expected}. Received: {key}={value!r}")
