"""The stages a pretraining run takes, computed once: the run prints them and `schedule --plot` draws them.

Most tasks train one stage on the training inputs. `stacked` trains one stage
per encoder block, each with its own schedule; `rotation` sees each input
four times an epoch (once per turn); `gan` trains on full batches at a
constant rate (DCGAN's Adam), whatever `--schedule` says.

Example:

>>> from transferkit.recipe import Recipe
from transferkit.training.defaults import gan_learning_rate
>>> [(s.name, s.epochs, s.steps_per_epoch) for s in plan_pretrain(Recipe(task="stacked", units=(8, 4), epochs=3),
...                                                                  examples=100)]
[('block 1', 3, 4), ('block 2', 3, 4)]
>>> plan_pretrain(Recipe(task="gan", epochs=2, lr=2e-4), examples=100)[0].schedule
'constant'
"""

from __future__ import annotations

import dataclasses
import math

from transferkit.recipe import Recipe
from transferkit.training.defaults import gan_learning_rate

TURNS = 4  # `rotation`: each input once per quarter turn


@dataclasses.dataclass(frozen=True)
class PlannedStage:
    """One pretraining stage: its name, epochs, optimizer steps per epoch, peak learning rate and schedule."""

    name: str
    epochs: int
    steps_per_epoch: int
    learning_rate: float | str
    schedule: str

    @property
    def steps(self) -> int:
        return self.epochs * self.steps_per_epoch


def plan_pretrain(recipe: Recipe, examples: int) -> list[PlannedStage]:
    """The stages of pretraining `recipe` (its epochs and lr resolved) on `examples` training inputs."""
    per_epoch = max(1, math.ceil(examples / recipe.batch_size))
    if recipe.task == "gan":
        return [PlannedStage("gan", recipe.epochs, max(1, examples // recipe.batch_size), gan_learning_rate(recipe),
                             "constant")]
    if recipe.task == "stacked":
        blocks = len(recipe.units if recipe.arch == "dense" else recipe.filters)
        return [PlannedStage(f"block {i}", recipe.epochs, per_epoch, recipe.lr, recipe.schedule)
                for i in range(1, blocks + 1)]
    if recipe.task == "rotation":
        per_epoch = max(1, math.ceil(TURNS * examples / recipe.batch_size))
    return [PlannedStage(recipe.task, recipe.epochs, per_epoch, recipe.lr, recipe.schedule)]


def describe_plan(stages: list[PlannedStage]) -> str:
    """The stages in one line, as the run prints them."""
    return ", ".join(f"{s.name} {s.epochs} epochs x {s.steps_per_epoch} steps ({s.schedule})" for s in stages)
