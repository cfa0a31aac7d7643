"""Unfreezing stages: what to unfreeze, for how many epochs, in order.

A schedule is written `head:2,top2:3,top4:3,all:5`: train the head alone for 2
epochs, then with the top 2 blocks of the base for 3, the top 4 for 3, and
everything for 5. This module does not import TensorFlow.

Example:

>>> from transferkit.training.stages import parse_stages
>>> [(s.name, s.top, s.epochs) for s in parse_stages("head:2,top2:3,all:5", num_blocks=6)]
[('head', 0, 2), ('top2', 2, 3), ('all', 6, 5)]
"""

from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING

from transferkit.errors import SettingsError

if TYPE_CHECKING:
    from transferkit.recipe import Recipe

_STAGE = re.compile(r"^(head|all|top(\d+)):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Stage:
    """One stage: its name, how many top blocks of the base train, and its epochs."""

    name: str
    top: int
    epochs: int


def plan_stages(recipe: Recipe, blocks: list[str]) -> list[Stage]:
    """The stages the recipe asks for, on a base with these `blocks` (names, bottom to top): a schedule
    (`unfreeze_schedule`), gradual unfreezing (`gradual`), or the head then the top `unfreeze_top`."""
    if recipe.unfreeze_schedule:
        return parse_stages(recipe.unfreeze_schedule, len(blocks))
    if recipe.unfreeze_top > len(blocks):
        raise SettingsError(
            f"--unfreeze-top {recipe.unfreeze_top} is more than the base has blocks: it has {len(blocks)} "
            f"({', '.join(blocks)})."
        )
    if recipe.gradual:
        return gradual_stages(recipe.head_epochs, recipe.epochs, len(blocks), recipe.unfreeze_top)
    return two_stages(recipe.head_epochs, recipe.unfreeze_top, recipe.epochs, len(blocks))


def parse_stages(text: str, num_blocks: int) -> list[Stage]:
    """Parse `head:2,top2:3,all:5` against a base with `num_blocks` blocks.

    Raises:
        SettingsError: an unknown keyword, `top0`, zero epochs, or more blocks than the base has.
    """
    stages = []
    for part in (p.strip() for p in text.split(",")):
        match = _STAGE.match(part)
        if not match:
            raise SettingsError(
                f"Unfreeze stage {part!r} is not KEYWORD:EPOCHS with KEYWORD head, topN or all "
                f"(for example head:2,top2:3,all:5). Received: unfreeze_schedule={text!r}"
            )
        keyword, n, epochs = match.group(1), match.group(2), int(match.group(3))
        top = 0 if keyword == "head" else num_blocks if keyword == "all" else int(n)
        if keyword.startswith("top") and top == 0:
            raise SettingsError(f"Unfreeze stage {part!r}: top0 unfreezes nothing; write head:{epochs}. "
                                f"Received: unfreeze_schedule={text!r}")
        stages.append(Stage(keyword, top, epochs))
    check_stages(stages, num_blocks)
    return stages


def two_stages(head_epochs: int, unfreeze_top: int, epochs: int, num_blocks: int) -> list[Stage]:
    """`--unfreeze-top N`: the head for `head_epochs`, then the top N blocks (0: the head alone) for `epochs`."""
    stages = [Stage("head", 0, head_epochs), Stage(f"top{unfreeze_top}" if unfreeze_top else "head", unfreeze_top,
                                                     epochs)]
    stages = [s for s in stages if s.epochs > 0]
    check_stages(stages, num_blocks, allow_empty=True)
    return stages


def gradual_stages(head_epochs: int, epochs: int, num_blocks: int, up_to: int = 0) -> list[Stage]:
    """ULMFiT's gradual unfreezing: the head, then one more block per stage, top first, up to `up_to` (all: 0)."""
    up_to = up_to or num_blocks
    stages = ([Stage("head", 0, head_epochs)] if head_epochs else []) + [
        Stage(f"top{n}", n, epochs) for n in range(1, up_to + 1)]
    check_stages(stages, num_blocks)
    return stages


def check_stages(stages: list[Stage], num_blocks: int, allow_empty: bool = False) -> None:
    if not stages and not allow_empty:
        raise SettingsError("The unfreezing schedule has no stages; expected at least one such as head:2.")
    for stage in stages:
        if stage.epochs < 1 and not allow_empty:
            raise SettingsError(f"Unfreeze stage {stage.name}:{stage.epochs} has no epochs; expected at least 1.")
        if stage.top > num_blocks:
            raise SettingsError(
                f"Unfreeze stage {stage.name} asks for {stage.top} blocks, more than the base has: {num_blocks}."
            )


def describe(stages: list[Stage]) -> str:
    return ",".join(f"{s.name}:{s.epochs}" for s in stages)
