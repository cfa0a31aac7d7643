"""A stage's compile: the recipe's optimizer, its learning-rate schedule and, for `lr="auto"`, the LR finder's rate.

Every stage compiles afresh (`compile_stage`): a new optimizer on a schedule
that starts again, with the rate factors of discriminative fine-tuning and the
weights' moving average when asked. The recipe's optimizer alone, at a given
rate, is `pieces.optimizers.make_optimizer`.

Example:

>>> rate, callbacks = compile_stage(model, recipe, 1e-3, total_steps=100, loss="mse")   # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from transferkit.errors import TransferkitError
from transferkit.pieces.optimizers import make_optimizer
from transferkit.recipe import Recipe
from transferkit.training.runs import print_line


def schedule_options(recipe: Recipe) -> dict[str, Any]:
    """The recipe's options for its schedule (plateau's factor and patience)."""
    if recipe.schedule == "plateau":
        return {"factor": recipe.plateau_factor, "patience": recipe.plateau_patience}
    return {}


def compile_stage(model, recipe: Recipe, learning_rate: float | str, total_steps: int, loss: Any,
                  metrics: list | None = None, lr_factors: dict[str, float] | None = None,
                  ema: float | None = None, lr_data: Any = None, verbose: bool = False) -> tuple[float, list]:
    """Compile `model` with the recipe's optimizer on its schedule over `total_steps`; the rate and the callbacks.

    `learning_rate` is the peak rate for onecycle and the starting rate otherwise;
    `"auto"`: the LR finder's `valley` on `lr_data` (what it sweeps, see
    `data.pipelines.learning_rate_data`), found on `model` compiled as it stands
    with the recipe's optimizer at 1e-3. Each call starts the schedule afresh.
    `lr_factors` gives variables their own rate factors (discriminative
    fine-tuning). `ema`: the optimizer keeps a moving average of the weights
    with this decay, which `keras.callbacks.SwapEMAWeights` (among the callbacks)
    swaps in for validation and `fit` leaves in the model.

    Raises:
        TransferkitError: the LR finder found no valley.
    """
    from transferkit.training.backend import jit_compile
    from transferkit.pieces.discriminative import with_learning_rate_factors
    from transferkit.pieces.lr_finder import lr_find
    from transferkit.pieces.momentum import schedule_callbacks
    from transferkit.pieces.schedules import make_schedule

    options = schedule_options(recipe)
    if learning_rate == "auto":
        model.compile(optimizer=make_optimizer(recipe, 1e-3), loss=loss, metrics=metrics)
        result = lr_find(model, lr_data, batch_size=recipe.batch_size)
        print_line(f"lr-find: {result.summary()}", verbose)
        if result.valley is None or not np.isfinite(result.valley):
            raise TransferkitError("The LR finder found no valley; pass --lr explicitly.")
        learning_rate = result.valley
    learning_rate = float(learning_rate)
    rate = make_schedule(recipe.schedule, learning_rate, max(1, total_steps), **options)
    opt = make_optimizer(recipe, rate, ema)
    if lr_factors:
        opt = with_learning_rate_factors(opt, lr_factors)
    model.compile(optimizer=opt, loss=loss, metrics=metrics, jit_compile=jit_compile(recipe.jit_compile))
    averaging = [keras.callbacks.SwapEMAWeights()] if ema else []
    return learning_rate, schedule_callbacks(recipe.schedule, rate, optimizer=opt, **options) + averaging
