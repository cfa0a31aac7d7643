"""The settings a run chooses for itself when the user leaves them unset, resolved in one place.

A stage's length is counted in optimizer steps, not epochs, so 14 labeled
examples and 60,000 both get a stage that can converge: an unset epoch count
becomes `ceil(steps / batches per epoch)`, at least `MIN_EPOCHS`. That count
is a maximum: every stage stops once its monitored loss has not improved for
`patience` epochs and keeps its best epoch's weights. This module does not
import TensorFlow.

The values were chosen by `bench/defaults.py` (digits at 1%, 5% and 10% of the
labels, 5 seeds, and a VGG16 on a folder of digit PNGs); README "Defaults".

Example:

>>> from transferkit.recipe import Recipe
>>> recipe, chosen = resolve_finetune(Recipe(), labeled=14, num_blocks=3)
>>> chosen
{'head_epochs': 600, 'epochs': 300, 'lr': 0.01, 'unfreeze_top': 3, 'finetune_lr_factor': 0.03}
"""

from __future__ import annotations

import math
from typing import Any

from transferkit.recipe import Recipe

HEAD_STEPS = 600  # the most optimizer steps of a head-only stage
FINETUNE_STEPS = 300  # of a stage that unfreezes blocks of the base
PRETRAIN_STEPS = 6000  # of pretraining (per block for `stacked`)
# pretraining's passes over a small folder: 6,000 steps over 180 photos would be 1,500 passes that
# cost minutes and overfit; the digits (1,258 inputs, 40 batches) reach their 6,000 steps in 150
PRETRAIN_MAX_EPOCHS = 150
MIN_EPOCHS = 5
# under 1cycle, early stopping judges a stage from this fraction of its epochs on: its rate has come half way
# down from the peak (judging the peak's epochs stopped stages too soon; bench/defaults.py, README "Defaults")
ONECYCLE_JUDGED_FROM = 0.5
FINETUNE_LR = 1e-2  # the head stage's peak rate; unfreezing stages take `finetune_lr_factor` of it
# of a base pretrained here: 0.03, between fastai's fine_tune (half the rate on the top layers, a hundredth of
# that at the bottom) and the Keras guide's hundredth; a tenth let the propagated stage of the default encoder
# (512,256,128 SELU, Nadam) spike to a loss of 24 and diverge on one of 5 seeds at 10% labels in
# bench/defaults.py, and 0.03 kept every unfreezing stage under a loss of 0.7 on all 30 default runs for the
# same test accuracy (0.704 / 0.900 / 0.932 at 1 / 5 / 10% labels, against 0.709 / 0.903 / 0.932);
# of an ImageNet-size network (a Keras Applications backbone): a hundredth, the Keras guide's ratio (Adam 1e-3
# for the head, 1e-5 for the whole model), since a tenth let a VGG16 diverge in bench/defaults.py
FINETUNE_LR_FACTOR = {"encoder": 0.03, "backbone": 0.01}
# the encoder's units, by the values an input holds: up to WIDE_INPUTS (a table, the 8x8 digits, a 32x32 RGB
# image: a 512-unit first block of at most 2M weights), the widest measured (bench/defaults.py: 512,256,128 beat
# 128,64,32 by 1.7 and 1.9 points at 5% and 10% labels); above it (photos), the narrower one: on a folder of 180
# photos resized to 150x147, 512 units made a 34M-weight first block (130 MB) and pretrained in 6:45 against
# 2:22, fine-tuned in 6:08 against 3:02, for 34 of 36 test images right against 33
PRETRAIN_UNITS = {"small": (512, 256, 128), "large": (128, 64, 32)}
WIDE_INPUTS = 4096
PRETRAIN_LR = {"gan": 2e-4}  # DCGAN's rate (Radford et al., 2016); other tasks: 1e-3 (Adam's default)
PRETRAIN_DEFAULT_LR = 1e-3


def epochs_for(steps: int, examples: int, batch_size: int, most: int | None = None) -> int:
    """The epochs that make about `steps` optimizer steps over `examples` in batches of `batch_size`.

    At least `MIN_EPOCHS`, and at most `most` (None: no bound).

    Example:

    >>> epochs_for(600, examples=72, batch_size=32), epochs_for(600, examples=60000, batch_size=32)
    (200, 5)
    >>> epochs_for(6000, examples=144, batch_size=32, most=150)
    150
    """
    per_epoch = max(1, math.ceil(examples / batch_size))
    epochs = max(MIN_EPOCHS, math.ceil(steps / per_epoch))
    return epochs if most is None else min(epochs, max(MIN_EPOCHS, most))


def resolve_pretrain(recipe: Recipe, examples: int, input_shape: tuple[int, ...] = ()
                     ) -> tuple[Recipe, dict[str, Any]]:
    """`recipe` with its unset pretraining settings chosen for `examples` training inputs, and what was chosen.

    Unset: `epochs` (from `PRETRAIN_STEPS`, at most `PRETRAIN_MAX_EPOCHS`), `lr` and `units`
    (`PRETRAIN_UNITS`: "small" for inputs of at most `WIDE_INPUTS` values, else "large").
    """
    chosen: dict[str, Any] = {}
    if recipe.units is None:
        chosen["units"] = PRETRAIN_UNITS["small" if math.prod(input_shape) <= WIDE_INPUTS else "large"]
    if recipe.epochs is None:
        chosen["epochs"] = epochs_for(PRETRAIN_STEPS, examples, recipe.batch_size, most=PRETRAIN_MAX_EPOCHS)
    if recipe.lr is None:
        chosen["lr"] = PRETRAIN_LR.get(recipe.task, PRETRAIN_DEFAULT_LR)
    return recipe.replace(**chosen), chosen


def resolve_finetune(recipe: Recipe, labeled: int, num_blocks: int, base_kind: str = "encoder"
                     ) -> tuple[Recipe, dict[str, Any]]:
    """`recipe` with its unset fine-tuning settings chosen for `labeled` examples and a base of `num_blocks`
    (see `choose_finetune`), and what was chosen."""
    chosen = choose_finetune(recipe, labeled, num_blocks, base_kind)
    return recipe.replace(**chosen), chosen


def choose_finetune(recipe: Recipe, labeled: int, num_blocks: int, base_kind: str = "encoder") -> dict[str, Any]:
    """The fine-tuning settings `recipe` leaves unset, chosen for `labeled` examples and a base of `num_blocks`.

    Unset: `head_epochs` (from `HEAD_STEPS`), `epochs` (from `FINETUNE_STEPS`),
    `lr` (`FINETUNE_LR`), `unfreeze_top` (every block, as fastai's
    `fine_tune`: the head first, then the whole base) and `finetune_lr_factor`
    (`FINETUNE_LR_FACTOR` of the `base_kind`: "encoder" or "backbone").
    """
    chosen: dict[str, Any] = {}
    if recipe.head_epochs is None:
        chosen["head_epochs"] = epochs_for(HEAD_STEPS, labeled, recipe.batch_size)
    if recipe.epochs is None:
        chosen["epochs"] = epochs_for(FINETUNE_STEPS, labeled, recipe.batch_size)
    if recipe.lr is None:
        chosen["lr"] = FINETUNE_LR
    if recipe.unfreeze_top is None and not recipe.unfreeze_schedule:
        chosen["unfreeze_top"] = num_blocks
    if recipe.finetune_lr_factor is None:
        chosen["finetune_lr_factor"] = FINETUNE_LR_FACTOR[base_kind]
    return chosen


def gan_learning_rate(recipe: Recipe) -> float:
    """The GAN's rate: the recipe's, or DCGAN's for `lr="auto"` (no LR finder for a two-player game)."""
    return PRETRAIN_LR["gan"] if recipe.lr in (None, "auto") else float(recipe.lr)


def describe_chosen(command: str, chosen: dict[str, Any]) -> str:
    """The line a command prints first: the settings it chose, written as flags a user can copy."""
    if not chosen:
        return f"{command}: every setting given"
    flags = " ".join(f"--{key.replace('_', '-')} {_flag_value(value)}" for key, value in chosen.items())
    return f"{command}: chosen automatically (set them to change): {flags}"


def _flag_value(value: Any) -> str:
    """`value` as a flag takes it: 0.001 for a float, 512,256,128 for a list."""
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(str(v) for v in value)
    return str(value)
