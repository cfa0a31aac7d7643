"""What the runner trains a fine-tuning stage on: its batches, validation, loss and what its backups keep.

`stage_of` turns a planned stage (`StagePlan`) and its inputs (the phase's rows,
or the frozen base's outputs computed once) into a `runner.Stage`: the shuffled
training batches (mixed with MixUp / CutMix when asked), the validation batches,
the batches in a fixed order (made only where used), and the header printed
once the stage's learning rate is known.

Example:

>>> stage = stage_of(plan, step, clf.model, {"train": x, "val": None}, y, False, [], "", 0, True)  # doctest: +SKIP
>>> runner.fit_stage(run, stage)                                                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np

from transferkit.data.pipelines import stage_batches
from transferkit.finetuning.plan import Plan, StagePlan
from transferkit.pieces.augmentation import mix_batches
from transferkit.training import backend, runner, runs


def stage_of(plan: Plan, step: StagePlan, trained: keras.Model, inputs: dict[str, Any], y: np.ndarray, cached: bool,
             unfrozen: list[str], table: str, resume_at: int, verbose: bool) -> runner.Stage:
    """What the runner trains for `step`: `trained` on `inputs` (and the validation inputs), targets `y`.

    `table`: the blocks' audit (`freezing.format_audit`), printed under the stage's header once it is compiled.
    """
    recipe, data, clf = plan.recipe, plan.data, plan.clf
    y_val = data.y[plan.split.val]
    validation = None if inputs["val"] is None else (
        inputs["val"], np.eye(data.num_classes, dtype="float32")[y_val] if step.soft else y_val)
    made = stage_batches(inputs["train"], y, plan.batch_size, recipe.seed, validation,
                         sweep_batch_size=recipe.batch_size if step.learning_rate == "auto" else None)
    batches = made.train
    if recipe.mixes:
        batches = mix_batches(batches, recipe.mixup, recipe.cutmix, seed=recipe.seed + step.index)
    first = max(step.start, resume_at)

    def compiled(lr: float) -> None:
        """The stage's header, once its learning rate is known, and the blocks' audit; then JAX's compiled loss."""
        runs.print_line(f"stage {step.name}: epochs {first + 1}-{step.end} on {len(y)} examples, {recipe.schedule} "
                        f"learning rate {lr:.3g}{', on cached base outputs' if cached else ''}"
                        f"{', uncached: its inputs change every epoch' if step.uncached else ''}; trainable: "
                        f"{', '.join(unfrozen) or 'no block'} + head", verbose)
        runs.print_line(table, verbose)
        backend.build_compiled(trained, made.unshuffled)

    return runner.Stage(
        step.name, trained, batches, start=step.start, end=step.end,
        batches_per_epoch=runs.steps_per_epoch(len(y), plan.batch_size), index=step.index, loss=step.loss,
        metrics=step.metrics, learning_rate=step.learning_rate, lr_data=made.sweep, patience=step.patience,
        loss_floor=math.log(data.num_classes),  # a uniform guess's cross-entropy
        retrains=step.retrains,  # propagate's last stage on the true labels, pseudo's rounds
        # val_loss where validation has an example of every class; else the training loss
        validated=len(y_val) >= data.num_classes, validation=made.validation, lr_factors=step.lr_factors,
        ema=recipe.ema, kept=clf.model, head=clf.head if cached else None, class_weight=plan.class_weight,
        unshuffled=made.unshuffled, on_compiled=compiled)
