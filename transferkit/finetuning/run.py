"""Fine-tuning: a new head on a saved encoder, a Keras Applications backbone or any Keras model file.

Training runs in stages. By default stage 1 trains the head with the base
frozen and stage 2 unfreezes the top `unfreeze_top` blocks of the base (0: the
head alone); `unfreeze_schedule` ("head:2,top2:3,all:5") or `gradual` give any
number of stages. Stages that unfreeze blocks train at `lr * finetune_lr_factor`,
with `lr_decay` dividing the rate again for each block below the top one. Each
stage compiles anew with a fresh optimizer (its schedule starts afresh), the
epoch count continues across stages, and BatchNorm layers of the base stay
frozen, so they run in inference mode (Keras 3 runs a BatchNormalization with
`trainable=False` on its moving statistics) unless `train_batchnorm`. A
head-only stage on a frozen, deterministic base trains on base outputs computed
once (`cache_features`; on one replica: under a multi-replica strategy the
base runs every epoch).

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.finetuning.run import run_finetune
>>> result = run_finetune(Recipe(from_="saved_models/digits-encoder",
...                              label_fraction=0.05, unfreeze_top=2))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.training import backend, runner, runs
from transferkit.pieces.augmentation import mix_batches
from transferkit.store.backup import Backup
from transferkit.data.sources import pipeline
from transferkit.finetuning.feature_cache import MEMORY_LIMIT_BYTES, can_cache, compute_features
from transferkit.pieces.freezing import audit, format_audit, freeze_all_but_top
from transferkit.recipe import Recipe
from transferkit.training.distributed import on_this_process
from transferkit.training.runtime import is_chief, training_context
from transferkit.finetuning.semi_supervised import flat_inputs, propagate_labels, pseudo_labels
from transferkit.training.stages import describe
from transferkit.finetuning.plan import Phase, Plan, StagePlan, plan_finetune


def run_finetune(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Build the classifier, train it stage by stage, test it, save it."""
    recipe = recipe.validate()
    settings = recipe.run_settings()  # as given, for the backups: what is chosen from them follows
    out = runs.out_dir(recipe, "classifier")
    runs.check_out_writable(out)
    with training_context(recipe) as strategy:
        plan = plan_finetune(recipe, strategy.num_replicas_in_sync)
        return _train(plan, out, settings, verbose and is_chief())


@dataclasses.dataclass
class Examples:
    """What a phase trains on: rows of the data and their targets (class indices, or probabilities if `soft`)."""

    rows: np.ndarray
    y: np.ndarray
    soft: bool = False


def _train(plan: Plan, out: Path, settings: dict[str, Any], verbose: bool) -> runs.Result:
    recipe, data, split, clf = plan.recipe, plan.data, plan.split, plan.clf
    x_val = data.x[split.val]
    semi = recipe.semi_supervised
    runs.print_line(plan.chosen_line, verbose)
    runs.print_line(f"finetune: {clf.info['description']} on {len(split.labeled)} labeled examples "
                    f"({recipe.label_fraction:g} of {len(split.train)}), {data.num_classes} classes; "
                    f"stages {describe(plan.stages)}"
                    + (f"; semi-supervised {semi} on {len(plan.unlabeled)} unlabeled examples"
                       if semi != "none" else ""), verbose)

    backup = Backup.for_output(out, settings)
    run = runner.Run(recipe, backup, backup.state(restart=recipe.restart), verbose, total_epochs=plan.total_epochs)
    if run.state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {run.resume_at + 1} of "
                        f"{plan.total_epochs}", verbose)
    # the base's outputs, per phase (None: validation), while the base's weights stay as they are
    outputs: dict[str | None, Any] = {}
    propagated = graph = None
    if semi == "propagate":  # on the base as given, before any backup
        propagated, graph = _propagate(plan)
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
        cached = step.cacheable and can_cache(clf.features)
        trained = clf.head if cached else clf.model
        started = time.perf_counter()
        # the interrupted run's weights, before its examples (a head-only backup's into the head)
        run.restore_weights(clf.model, step.start, clf.head)
        if examples is None:
            examples = _examples(plan, step.phase, propagated, backup)
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
        stage = _stage(plan, step, trained, inputs, y, cached, unfrozen, run.resume_at, verbose)
        finished = runner.fit_stage(run, stage)
        if step.top:  # the base has trained: a later head stage needs its new outputs
            outputs.clear()
        record.update(lr=finished.learning_rate, seconds=round(time.perf_counter() - started, 3),
                      cached=bool(cached))
        if finished.stopping is not None and finished.stopping.stopped_epoch:
            record.update(stopped_after=finished.stopping.stopped_epoch + 1,
                          best_epoch=finished.stopping.best_epoch + 1)
    history = run.history

    loss, accuracy = plan.test_loss
    # the last stage trained the head alone, or on soft labels: compile the classifier for the true labels
    if trained is not clf.model or getattr(clf.model, "loss", None) != loss:
        clf.model.compile(optimizer=runner.make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
    test_loss, test_accuracy = clf.model.evaluate(
        pipeline(data.x[split.test], data.y[split.test], plan.batch_size), verbose=0)
    metrics = {"test_accuracy": float(test_accuracy), "test_loss": float(test_loss)}
    manifest = runs.base_manifest("classifier", recipe, data, split)
    manifest.update(plan.record, stages=done, semi_supervised=plan.semi_record, metrics=metrics)
    runs.save_run(out, clf.model, recipe, manifest, split, history)
    backup.discard()
    runs.print_line(f"test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(split.test)} "
                    f"held-out examples; classifier saved to {out}", verbose)
    return runs.Result(model=clf.model, history=history, metrics=metrics, artifact=out, manifest=manifest)


def _stage(plan: Plan, step: StagePlan, trained: keras.Model, inputs: dict[str, Any], y: np.ndarray, cached: bool,
           unfrozen: list[str], resume_at: int, verbose: bool) -> runner.Stage:
    """What the runner trains for `step`: `trained` on `inputs` (and the validation inputs), targets `y`."""
    recipe, data, clf = plan.recipe, plan.data, plan.clf
    y_val = data.y[plan.split.val]
    loss, accuracy = step.loss, step.metrics
    # in a fixed order, made only where used (training health; JAX's compiled loss)
    unshuffled = functools.cache(functools.partial(pipeline, inputs["train"], y, plan.batch_size))
    batches = pipeline(inputs["train"], y, plan.batch_size, shuffle=True, seed=recipe.seed)
    validation = None if inputs["val"] is None else pipeline(
        inputs["val"], np.eye(data.num_classes, dtype="float32")[y_val] if step.soft else y_val, plan.batch_size)
    if recipe.mixes:
        batches = mix_batches(batches, recipe.mixup, recipe.cutmix, seed=recipe.seed + step.index)

    def compiled(lr: float) -> None:
        if verbose:
            runs.print_line(step.header(lr, len(y), max(step.start, resume_at), recipe.schedule, cached, unfrozen),
                            verbose)
            runs.print_line(format_audit(audit(clf.model, step.lr_factors, clf.blocks)), verbose)
        backend.build_compiled(trained, unshuffled)

    return runner.Stage(
        step.name, trained, batches, start=step.start, end=step.end,
        batches_per_epoch=runs.steps_per_epoch(len(y), plan.batch_size), index=step.index, loss=loss,
        metrics=accuracy, learning_rate=step.learning_rate, lr_data=(inputs["train"], y), patience=step.patience,
        loss_floor=math.log(data.num_classes),  # a uniform guess's cross-entropy
        retrains=step.retrains,  # propagate's last stage on the true labels, pseudo's rounds
        # val_loss where validation has an example of every class; else the training loss
        validated=len(y_val) >= data.num_classes, validation=validation, lr_factors=step.lr_factors,
        ema=recipe.ema, kept=clf.model, head=clf.head if cached else None, class_weight=plan.class_weight,
        unshuffled=unshuffled, on_compiled=compiled)


FLAT_FEATURES = 1e-6  # the largest spread across examples of any feature, below which the head has nothing


def warn_if_constant(features: np.ndarray, description: str) -> bool:
    """Warn on stderr, once, when no feature of the base varies across the examples: the head can only guess.

    A backbone with random weights (`--weights none`) keeps BatchNorm's initial
    statistics, and a deep one can then output the same (near-zero) features for
    every input. Returns whether it warned.
    """
    spread = float(np.std(features.reshape(len(features), -1), axis=0).max()) if len(features) > 1 else 1.0
    if spread >= FLAT_FEATURES:
        return False
    print(f"warning: the features of {description} do not vary across the training examples (largest spread "
          f"{spread:.2g}): the head can only guess. Use pretrained weights (--weights imagenet or a weights file) "
          "or another base.", file=sys.stderr, flush=True)
    return True


def _examples(plan: Plan, phase: Phase, propagated: np.ndarray | None, backup: Backup) -> Examples:
    """The rows and targets of `phase`; a pseudo-labeling round labels the pool with the model as it stands."""
    split, data, recipe = plan.split, plan.data, plan.recipe
    if phase.name == "labeled":
        return Examples(split.labeled, data.y[split.labeled])
    pool = plan.unlabeled
    if phase.name == "propagated":
        return Examples(np.concatenate([split.labeled, pool]), propagated, soft=True)
    saved = backup.folder / f"{phase.name}.json"  # a resumed round keeps the pseudo-labels it started with
    if saved.is_file():
        chosen = artifacts.read_json(backup.folder, saved.name)
        rows, labels = np.asarray(chosen["rows"], dtype=np.int64), np.asarray(chosen["labels"], dtype=np.int64)
    else:
        with on_this_process():  # each process labels the whole pool (the same labels on all)
            probs = plan.clf.model.predict(pipeline(data.x[pool], batch_size=plan.batch_size), verbose=0)
        picked, labels = pseudo_labels(probs, phase.round, recipe.pseudo_rounds, recipe.pseudo_threshold)
        rows = pool[picked]
        if is_chief():
            backup.folder.mkdir(parents=True, exist_ok=True)
            artifacts.write_json(saved, {"rows": rows.tolist(), "labels": labels.tolist()})
    return Examples(np.concatenate([split.labeled, rows]),
                    np.concatenate([data.y[split.labeled], labels]).astype(data.y.dtype))


def _propagate(plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """LabelSpreading's soft labels for labeled + unlabeled training rows, and the base's outputs it used.

    The raw inputs stand in for the base's outputs (then None) with
    `propagate_on="inputs"` and when the base has no pretrained weights (a
    backbone with `weights="none"`). Features are joined by their angle (a
    cosine kNN graph), inputs by their distance.
    """
    data, split, clf = plan.data, plan.split, plan.clf
    rows = np.concatenate([split.labeled, plan.unlabeled])
    graph = None
    if plan.graph_on == "features":
        graph = compute_features(clf.features, data.x[rows], plan.batch_size, limit_bytes=math.inf)
    labels = np.concatenate([data.y[split.labeled], np.full(len(plan.unlabeled), -1)]).astype(np.int64)
    # a graph on the inputs holds them flattened (N x d float32, filled batch by batch): kNN needs every row at once
    on = flat_inputs(data.x, rows, plan.batch_size) if graph is None else graph.astype(np.float64)
    # a network's features by their angle (the scale of a code says little); inputs by distance, as scikit-learn
    return propagate_labels(on, labels, data.num_classes, cosine=graph is not None), graph
