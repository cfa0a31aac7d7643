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
import tomllib
from pathlib import Path
from typing import Any

from transferkit.pieces.augment_spec import parse_augment
from transferkit.finetuning.class_weights import check_class_weight_setting
from transferkit.errors import SettingsError
from transferkit.pieces.optimizers import OPTIMIZERS
from transferkit.training.runtime import DEVICES, PRECISIONS, STRATEGIES
from transferkit.settings import BASE, FINETUNE, PRETRAIN, at_least, coerce_value, describe, in_range, setting

TASKS = ("autoencoder", "denoising", "stacked", "rotation", "pairs", "gan")
NOISE_KINDS = ("gaussian", "dropout")
SEMI_SUPERVISED = ("none", "pseudo", "propagate")
GRAPHS = ("features", "inputs")  # what propagate's kNN graph is built on
SCHEDULES = ("onecycle", "constant", "power", "exponential", "piecewise", "plateau")
ARCHS = ("dense", "conv")
BATCHNORM = ("none", "before", "after")
COMMANDS = ("pretrain", "finetune")
RESIZE_MODES = ("stretch", "crop", "pad")  # image_dataset_from_directory: stretch, crop_ or pad_to_aspect_ratio
PREPROCESS = ("none", "scale:1/255", "tf", "imagenet-caffe", "imagenet-torch")  # --base: see transferkit.finetuning.bases


def _positive_integers(values: tuple[int, ...]) -> bool:
    return bool(values) and all(v >= 1 for v in values)


def _augment_spec(spec: str) -> bool:
    parse_augment(spec)  # raises SettingsError naming the bad word
    return True


def _class_weight(value: str) -> bool:
    check_class_weight_setting(value)  # raises SettingsError naming a missing file
    return True


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Every setting of `pretrain` and `finetune`, with the defaults of the demo.

    Field names are the CLI flags with `-` written `_` (`--label-fraction` is
    `label_fraction`); `--from` is `from_` because `from` is a Python keyword
    (the TOML key is `from`). Each field's help, choices and check are its
    `transferkit.settings.Setting`; the CLI's options are generated from them.
    """

    # data and split
    data: str = setting("digits", "Data spec: digits, npz:PATH, dir:PATH or tfds:NAME[:SPLIT].")
    seed: int = setting(0, "Seed of initialization, shuffling and the label subset.")
    split_seed: int | None = setting(None, "Seed of the train/validation/test split.",
                                     auto="--seed, or the encoder's with --from")
    test_fraction: float = setting(0.2, "Fraction of the examples held out for the test.",
                                   check=in_range(0, 1, low_open=True, high_open=True), expected="a number in (0, 1)")
    val_fraction: float = setting(0.1, "Fraction of the examples held out for validation (early stopping).",
                                  check=in_range(0, 1, high_open=True), expected="a number in [0, 1)")
    label_fraction: float = setting(1.0, "Fraction of training examples whose labels are kept.", commands=FINETUNE,
                                    check=in_range(0, 1, low_open=True), expected="a number in (0, 1]")
    image_size: int | None = setting(None, "Resize dir: and tfds: images to this square size.",
                                     check=at_least(1), expected="an integer >= 1",
                                     auto="the backbone's or the encoder's size; else the images' own, or their "
                                          "median if they differ, at most 224 a side")
    resize: str = setting("stretch", "How images of another aspect ratio reach the size: stretch, crop (the "
                                     "center) or pad (with black).", choices=RESIZE_MODES)
    skip_bad_files: bool = setting(False, "Skip dir: files that cannot be decoded, counted and listed, instead of "
                                          "stopping.")
    # training
    epochs: int | None = setting(None, "Most epochs of training (finetune: of each unfreezing stage); early "
                                       "stopping may end it sooner.", check=at_least(0), expected="an integer >= 0",
                                 auto={"pretrain": "auto: about 6000 optimizer steps (at most 150 epochs, at least 5)",
                                       "finetune": "auto: about 300 optimizer steps per unfreezing stage, at least 5 "
                                                   "epochs",
                                       "": "auto: about 6000 optimizer steps to pretrain (at most 150 epochs), 300 "
                                           "per unfreezing stage, at least 5 epochs"})
    batch_size: int = setting(32, "Examples per optimizer step.", check=at_least(1), expected="an integer >= 1")
    lr: float | str | None = setting(None, "Learning rate (the peak, for onecycle), or auto: the LR finder's "
                                           "valley.", check=lambda v: v == "auto" or at_least(0, strictly=True)(v),
                                     expected="a positive number or auto",
                                     auto={"pretrain": "0.001, 0.0002 for --task gan", "finetune": "0.01",
                                           "": "0.01 to fine-tune, 0.001 to pretrain, 0.0002 for --task gan"})
    patience: int = setting(20, "Stop a stage once its loss (val_loss when the validation part has an example of "
                                "every class) has not improved for N epochs, keeping its best epoch's weights "
                                "(0: off); under onecycle, from the stage's middle on.", check=at_least(0), expected="an integer >= 0")
    optimizer: str = setting("nadam", "The optimizer (Keras's, by its name).", choices=OPTIMIZERS)
    schedule: str = setting("onecycle", "Learning-rate schedule.", choices=SCHEDULES)
    plateau_factor: float = setting(0.1, "--schedule plateau: multiply the rate by this.",
                                    check=in_range(0, 1, low_open=True, high_open=True), expected="a number in (0, 1)")
    plateau_patience: int = setting(10, "--schedule plateau: epochs without progress.", check=at_least(0),
                                    expected="an integer >= 0")
    activation: str = setting("selu", "Activation of the encoder and head: selu, relu, elu, gelu, swish, mish, "
                                      "tanh, ... (with its matching initializer).")
    batchnorm: str = setting("none", "BatchNorm in the encoder and head: none, before or after the activation.",
                             choices=BATCHNORM)
    dropout: float = setting(0.0, "Dropout rate (alpha dropout for SELU).", check=in_range(0, 1, high_open=True),
                             expected="a number in [0, 1)")
    mc_dropout: bool = setting(False, "Dropout that stays on at inference.")
    max_norm: float | None = setting(None, "Max-norm constraint on each kernel.", check=at_least(0, strictly=True),
                                     expected="a positive number", auto="none")
    clipnorm: float | None = setting(None, "Clip each gradient to this norm.", check=at_least(0, strictly=True),
                                     expected="a positive number", auto="none")
    clipvalue: float | None = setting(None, "Clip each gradient component to [-v, v].",
                                      check=at_least(0, strictly=True), expected="a positive number", auto="none")
    # pretrain
    task: str = setting("denoising", "Pretraining task.", commands=PRETRAIN, choices=TASKS)
    arch: str = setting("dense", "Encoder architecture.", commands=PRETRAIN, choices=ARCHS)
    units: tuple[int, ...] | None = setting(None, "Dense units per block, bottom to top, e.g. 128,64,32.",
                                            commands=PRETRAIN, kind="list", check=_positive_integers,
                                            expected="positive integers",
                                            auto="512,256,128 for inputs of up to 4096 values, else 128,64,32")
    filters: tuple[int, ...] = setting((16, 32, 32), "Conv filters per block, e.g. 16,32,32.", commands=PRETRAIN,
                                       kind="list", check=_positive_integers, expected="positive integers")
    noise: float = setting(0.3, "Denoising noise: the fraction of inputs masked (dropout), or the std as a "
                                "fraction of the data's (gaussian).",
                           commands=PRETRAIN, check=in_range(0, 1), expected="a number in [0, 1]")
    noise_kind: str = setting("dropout", "Denoising noise: dropout (masking: a fraction --noise of the inputs "
                                         "set to 0) or gaussian.", commands=PRETRAIN,
                              choices=NOISE_KINDS)
    tied_weights: bool = setting(False, "Dense decoder reuses the encoder's kernels.", commands=PRETRAIN)
    # finetune: the base
    from_: str | None = setting(None, "A saved encoder artifact.", commands=BASE, kind="folder",
                                auto="none: the base is one of --from, --backbone, --base")
    backbone: str | None = setting(None, "A Keras Applications backbone: mobilenetv2, efficientnetb0, resnet50, "
                                         "densenet121, vgg16, convnexttiny, ... (transferkit.BACKBONES); or "
                                         "hub:PRESET, hub:DIR: a keras-hub preset or preset folder (pip install "
                                         "'transferkit[hub]').",
                                   commands=BASE, auto="none")
    weights: str = setting("none", "Backbone weights: imagenet, none or a weights file.", commands=BASE)
    base: str | None = setting(None, "Any Keras model file (.keras, or a legacy .h5) as the base, cut before its "
                                     "classifier.", commands=BASE, kind="path", auto="none")
    cut: str | None = setting(None, "--base: the layer its body ends with, by name or negative index (-2: all but "
                                    "the last layer).", commands=BASE,
                              check=lambda v: not str(v).lstrip("+").isdigit(),
                              expected="a layer name or a negative index",
                              auto="after the last global pooling or Flatten layer, else before the last Dense")
    preprocess: str | None = setting(None, "--base: what its weights expect of 0..255 pixels: none, scale:1/255 (to "
                                           "[0, 1]), tf (to [-1, 1]), imagenet-caffe (BGR minus the means), "
                                           "imagenet-torch (standardized).", commands=BASE, choices=PREPROCESS,
                                     auto="none: the base takes 0..255 pixels")
    # finetune: the stages
    head_epochs: int | None = setting(None, "Most epochs of stage 1 (head only, base frozen).", commands=BASE,
                                      check=at_least(0), expected="an integer >= 0",
                                      auto="auto: about 600 optimizer steps, at least 5 epochs")
    head_patience: int | None = setting(None, "Deprecated: the older name of --patience, for head-only stages.",
                                        commands=BASE, check=at_least(0), expected="an integer >= 0", auto="--patience")
    unfreeze_top: int | None = setting(None, "Blocks of the base to unfreeze in stage 2 (0: head only).",
                                       commands=BASE, check=at_least(0), expected="an integer >= 0",
                                       auto="every block")
    unfreeze_schedule: str | None = setting(None, "Stages KEYWORD:EPOCHS, e.g. head:2,top2:3,top4:3,all:5.",
                                            commands=BASE, auto="head for --head-epochs, then topN (N: "
                                                                "--unfreeze-top) for --epochs")
    gradual: bool = setting(False, "ULMFiT's gradual unfreezing: one more block per stage (of --epochs each), top "
                                   "first.", commands=BASE)
    finetune_lr_factor: float | None = setting(None, "Learning rate of unfreezing stages = lr x this.",
                                               commands=BASE, check=at_least(0, strictly=True),
                                               expected="a positive number",
                                               auto="0.03 on an encoder, 0.01 on a backbone")
    label_smoothing: float = setting(0.0, "Spread this much of each target's probability over every class "
                                          "(Szegedy et al. 2016).", commands=BASE,
                                     check=in_range(0, 1, high_open=True), expected="a number in [0, 1)")
    lr_decay: float = setting(1.0, "Each block below the top one learns at 1/D of the one above (discriminative "
                                   "fine-tuning; ULMFiT uses 2.6).", commands=BASE, check=at_least(1),
                              expected="a number >= 1 (ULMFiT uses 2.6)")
    train_batchnorm: bool = setting(False, "Let BatchNorm in unfrozen blocks train (frozen: in inference mode).",
                                    commands=BASE, off="--freeze-batchnorm")
    cache_features: bool = setting(True, "Train head-only stages on base outputs computed once (not with "
                                         "--augment, --mixup or --cutmix, which change the inputs every epoch: "
                                         "those run the base every epoch).", commands=BASE)
    # finetune: what it adds
    augment: str = setting("none", "Random image augmentation inside the model, in training only (serve and "
                                   "predict never see it): light (rotate:10, zoom:0.1, translate:0.1), "
                                   "medium (flip, rotate:15, zoom:0.15, translate:0.1, contrast:0.2) or a comma list "
                                   "of flip, rotate:DEG, zoom:F, translate:F, contrast:F, randaugment. Head stages "
                                   "then run the frozen base every epoch instead of on cached outputs.",
                           commands=FINETUNE,
                           check=_augment_spec, expected="none, light, medium or a comma list of flip, rotate:DEG, "
                                                         "zoom:F, translate:F, contrast:F, randaugment")
    mixup: float = setting(0.0, "MixUp each training batch with this alpha (Beta(alpha, alpha) weights; 0: off; "
                                "images only; also uncaches head stages).", commands=FINETUNE, check=at_least(0),
                           expected="a number >= 0 (MixUp's alpha; 0: off)")
    cutmix: float = setting(0.0, "CutMix each training batch: its factor in [0, 1] (0: off; images only; with "
                                 "--mixup each batch gets one of the two).", commands=FINETUNE, check=in_range(0, 1),
                            expected="a number in [0, 1] (CutMix's factor; 0: off)")
    class_weight: str = setting("none", "Per-class loss weights: balanced (n / (classes x n_class)), none, or a "
                                        "JSON file of class name -> weight.", commands=FINETUNE,
                                check=_class_weight, expected="balanced, none or an existing JSON file of "
                                                              "per-class weights")
    ema: float | None = setting(None, "Keep an exponential moving average of the weights with this decay, e.g. "
                                      "0.999; it is validated and saved instead of the last weights.",
                                commands=FINETUNE, check=in_range(0, 1, low_open=True, high_open=True),
                                expected="a number in (0, 1), the decay of the weights' moving average (0.999 is "
                                         "common)", auto="off")
    semi_supervised: str = setting("none", "Learn from the unlabeled training examples too: self-training (pseudo) "
                                           "or label propagation over the base's features (propagate).",
                                   commands=FINETUNE, choices=SEMI_SUPERVISED)
    pseudo_rounds: int = setting(5, "Rounds of pseudo-labeling.", commands=FINETUNE, check=at_least(1),
                                 expected="an integer >= 1")
    pseudo_threshold: float | None = setting(None, "Keep only pseudo-labels at least this probable, in (0, 1).",
                                             commands=FINETUNE, check=in_range(0, 1, low_open=True, high_open=True),
                                             expected="a number in (0, 1)", auto="the top-k alone")
    propagate_on: str = setting("features", "The kNN graph of propagate: on the base's features or the raw "
                                            "inputs.", commands=FINETUNE, choices=GRAPHS)
    # where it runs
    device: str = setting("auto", "Where to train.", choices=DEVICES)
    strategy: str = setting("auto", "auto: TPU if found, mirrored with 2+ GPUs, else default (TensorFlow); "
                                    "multiworker: every device of several processes (JAX, keras.distribution; "
                                    "README \"Several machines\").", choices=STRATEGIES)
    precision: str = setting("float32", "float32 or mixed precision.", choices=PRECISIONS)
    jit_compile: bool = setting(False, "XLA-compile the training step.")
    # training health
    health_every: int = setting(0, "Check gradients and activations every N steps; warn once per problem (0: off).",
                                check=at_least(0), expected="an integer >= 0 (0: off)")
    tensorboard: str | None = setting(None, "Write the training curves, and the training-health figures (checked "
                                            "every 50 steps), for TensorBoard here.", kind="folder", auto="off")
    # resume after a crash
    backup_every: int | None = setting(None, "Also back up every N steps (always at each epoch end).",
                                       check=at_least(1), expected="an integer >= 1", auto="each epoch end only")
    restart: bool = setting(False, "Discard a backup of an interrupted run instead of continuing it.",
                            off="--resume")
    # output
    out: str | None = setting(None, "Artifact folder.", kind="folder", auto="saved_models/NAME")
    name: str | None = setting(None, "Artifact name under saved_models/.", auto="from the data spec")

    def replace(self, **overrides: Any) -> "Recipe":
        """A copy with `overrides` applied; `None` values leave a field as it is."""
        unknown = sorted(set(overrides) - set(field_names()))
        if unknown:
            raise SettingsError(
                f"Unknown setting {unknown[0]!r}; expected one of {', '.join(field_names())}."
            )
        given = {k: coerce_value(k, v) for k, v in overrides.items() if v is not None}
        return dataclasses.replace(self, **given).validate()

    def check_base(self) -> "Recipe":
        """This recipe, if it names the base fine-tuning builds on: `from_`, `backbone` or `base`.

        Raises:
            SettingsError: none of them is set.
        """
        if not self.from_ and not self.backbone and not self.base:
            raise SettingsError("finetune needs a base: --from DIR (a saved encoder), --backbone NAME (Keras "
                                "Applications) or --base FILE (a Keras model file).")
        return self

    def validate(self) -> "Recipe":
        """Check every value (each field's `Setting`, then the rules between fields); raise `SettingsError`."""
        for field in dataclasses.fields(self):
            message = describe(field).error(field.name, getattr(self, field.name))
            if message:
                raise SettingsError(message)
        _check(self.test_fraction + self.val_fraction < 1, "val_fraction", self.val_fraction,
               f"val_fraction + test_fraction < 1 (test_fraction={self.test_fraction})")
        _check(not (self.gradual and self.unfreeze_schedule), "gradual", self.gradual,
               "either --gradual or --unfreeze-schedule, not both")
        bases = {flag: value for flag, value in (("from", self.from_), ("backbone", self.backbone),
                                                 ("base", self.base)) if value}
        if len(bases) > 1:
            raise SettingsError("The base must be exactly one of --from, --backbone, --base. Received: "
                                + ", ".join(f"{flag}={value!r}" for flag, value in bases.items()))
        if self.clipnorm is not None and self.clipvalue is not None:  # Keras's optimizers take one clipping
            raise SettingsError("Only one of clipnorm and clipvalue can be set. "
                                f"Received: clipnorm={self.clipnorm!r}, clipvalue={self.clipvalue!r}")
        _check(self.cut is None or self.base, "cut", self.cut, "given with --base FILE")
        _check(self.preprocess is None or self.base, "preprocess", self.preprocess, "given with --base FILE")
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

    def to_toml(self) -> str:
        """The recipe as the text of a TOML file (an artifact's `recipe.toml`), which `load_recipe` reads back."""
        return dump_toml(self.to_dict())

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


def check_value(name: str, value: Any, label: str | None = None) -> Any:
    """`value` of the field `name` as the Recipe stores it (`"128,64"` becomes `(128, 64)`), if its `Setting` allows it.

    The rules between fields are `Recipe.validate`'s. `label` names the value in the
    error (the CLI passes the flag, `--lr`); default `name`.

    Raises:
        SettingsError: the value cannot be read as the field's type, or is not allowed.

    Example:

    >>> check_value("units", "128,64")
    (128, 64)
    """
    label = label or name
    value = coerce_value(name, value, label)
    message = describe(Recipe.__dataclass_fields__[name]).error(label, value)
    if message:
        raise SettingsError(message)
    return value


def _check(ok: bool, key: str, value: Any, expected: str) -> None:
    if not ok:
        raise SettingsError(f"{key} must be {expected}. Received: {key}={value!r}")
