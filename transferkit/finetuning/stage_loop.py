"""The stages of a fine-tuning run, in the order the Plan gives them: each frozen, fed and handed to the runner.

Before the first stage, a `propagate` run spreads the labels over the pool (on
the base as given, before any backup is restored). Each stage then freezes all
but its top blocks, takes the backed-up weights when the run resumes in it,
picks its phase's examples (a pseudo-labeling round labels the pool with the
model as it stands), computes the frozen base's outputs once when it can train
on them (`feature_cache`), and trains through `runner.fit_stage`. What a phase
trains on comes from `finetuning.examples`; what the runner gets for a stage,
from `finetuning.stage_inputs`.

Example:

>>> trained = train_stages(plan_finetune(recipe, writes=True), settings, verbose=True)   # doctest: +SKIP
>>> [stage["name"] for stage in trained.stages]                                   # doctest: +SKIP
['head', 'top2']
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np

from transferkit.finetuning.examples import phase_examples, propagate
from transferkit.finetuning.feature_cache import MEMORY_LIMIT_BYTES, can_cache, compute_features, warn_if_constant
from transferkit.finetuning.plan import Plan
from transferkit.finetuning.stage_inputs import stage_of
from transferkit.pieces.freezing import audit, format_audit, freeze_all_but_top
from transferkit.store.backup import Backup
from transferkit.training import runner, runs
from transferkit.training.stages import describe


@dataclasses.dataclass
class Trained:
    """What the stages leave: the run (its history), its backup, each stage's record, and the model last trained."""

    run: runner.Run
    backup: Backup
    stages: list[dict[str, Any]]
    trained: keras.Model  # the classifier, or its head alone when the last stage trained on cached base outputs


def train_stages(plan: Plan, settings: dict[str, Any], verbose: bool) -> Trained:
    """Train every stage of `plan` in order (resuming from the backup of its output folder, `plan.out`, made with
    `settings`)."""
    recipe, data, split, clf = plan.recipe, plan.data, plan.split, plan.clf
    x_val = data.x[split.val]
    semi = recipe.semi_supervised
    runs.print_line(plan.chosen_line, verbose)
    runs.print_line(f"finetune: {clf.info['description']} on {len(split.labeled)} labeled examples "
                    f"({recipe.label_fraction * 100:g}% of {len(split.train)} training examples), "
                    f"{data.num_classes} classes; "
                    f"stages {describe(plan.stages)}"
                    + (f"; semi-supervised {semi} on {len(plan.unlabeled)} unlabeled examples"
                       if semi != "none" else ""), verbose)
    backup = Backup.for_output(plan.out, settings)
    run = runner.Run(recipe, backup, backup.state(restart=recipe.restart), verbose, total_epochs=plan.total_epochs)
    if run.state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {run.resume_at + 1} of "
                        f"{plan.total_epochs}", verbose)
    propagated = graph = None
    if semi == "propagate":  # on the base as given, before any backup
        propagated, graph = propagate(plan)
    # the base's outputs, per phase (None: validation), while the base's weights stay as they are
    outputs: dict[str | None, Any] = {}
    # the graph's features are the first phase's examples, in its order: its first stage may reuse them
    reuse = graph if graph is not None and not run.state and graph.nbytes <= MEMORY_LIMIT_BYTES else None
    del graph
    done: list[dict[str, Any]] = []
    trained = clf.model
    examples = None
    for step in plan.stage_plans:
        record = {"name": step.stage.name, "phase": step.phase.name, "unfreeze_top": step.top,
                  "epochs": step.stage.epochs, "lr": None, "schedule": recipe.schedule, "seconds": 0.0}
        done.append(record)
        if step.first_of_phase:
            examples = None
        if run.finished_before(step.end):
            continue
        unfrozen = freeze_all_but_top(clf.base, clf.blocks, step.top, recipe.train_batchnorm)
        table = format_audit(audit(clf.model, step.lr_factors, clf.blocks)) if verbose else ""
        cached = step.cacheable and can_cache(clf.features)
        trained = clf.head if cached else clf.model
        started = time.perf_counter()
        # the interrupted run's weights, before its examples (a head-only backup's into the head)
        run.restore_weights(clf.model, step.start, clf.head)
        if examples is None:
            examples = phase_examples(plan, step.phase, propagated, backup)
            if step.phase.round:
                plan.semi_record["pseudo_labeled"][step.phase.name] = len(examples.rows) - len(split.labeled)
        x, y = data.x[examples.rows], examples.y
        if recipe.mixes and not examples.soft:  # mixed batches mix one-hot targets
            y = np.eye(data.num_classes, dtype="float32")[y]
        inputs = {"train": x, "val": x_val if len(x_val) else None}
        if cached:
            caching = time.perf_counter()
            if reuse is not None:
                outputs.setdefault(step.phase.name, reuse)
            for key, rows in ((step.phase.name, x), (None, x_val)):
                if key not in outputs:
                    outputs[key] = compute_features(clf.features, rows, plan.batch_size) if len(rows) else None
            inputs = {"train": outputs[step.phase.name], "val": outputs[None]}
            record["caching_seconds"] = round(time.perf_counter() - caching, 3)
            if step.index == 0 and isinstance(inputs["train"], np.ndarray):
                warn_if_constant(inputs["train"], clf.info["description"])
        reuse = None  # used by the first stage, or not at all: free it
        stage = stage_of(plan, step, trained, inputs, y, cached, unfrozen, table, run.resume_at, verbose)
        finished = runner.fit_stage(run, stage)
        if step.top:  # the base has trained: a later head stage needs its new outputs
            outputs.clear()
        record.update(lr=finished.learning_rate, seconds=round(time.perf_counter() - started, 3),
                      cached=bool(cached))
        if finished.stopping is not None and finished.stopping.stopped_epoch:
            record.update(stopped_after=finished.stopping.stopped_epoch + 1,
                          best_epoch=finished.stopping.best_epoch + 1)
    return Trained(run, backup, done, trained)
