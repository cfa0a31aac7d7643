"""Fine-tuning: a new head on a saved encoder or a Keras Applications backbone.

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
>>> from transferkit.finetuning import run_finetune
>>> result = run_finetune(Recipe(from_="saved_models/digits-encoder",
...                              label_fraction=0.05, unfreeze_top=2))  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit import artifacts, runs
from transferkit.backbones import (
    backbone_input_size, blocks_of, build_backbone, get_backbone, image_adapter,
)
from transferkit.backup import Backup, BackupCallback
from transferkit.callbacks import StopOnNaN
from transferkit.data import Data, Split, load_data, pipeline, split_data
from transferkit.errors import SettingsError
from transferkit.discriminative import block_factors
from transferkit.feature_cache import can_cache, compute_features
from transferkit.freezing import audit, format_audit, freeze_all_but_top
from transferkit.health import TrainingHealth
from transferkit.recipe import Recipe
from transferkit.setups import dropout_layer, setup_for
from transferkit.stages import Stage, describe, gradual_stages, parse_stages, two_stages

Blocks = list[tuple[str, list[keras.layers.Layer]]]


@dataclasses.dataclass
class Classifier:
    """The classifier and its parts: the base, its blocks, the path to the features, the head."""

    model: keras.Model
    base: keras.Model
    blocks: Blocks
    features: keras.Model
    head: keras.Model
    info: dict[str, Any]


@dataclasses.dataclass
class Plan:
    """Everything a fine-tuning run is made of, before any training."""

    recipe: Recipe
    data: Data
    split: Split
    clf: Classifier
    stages: list[Stage]
    out: Path
    replicas: int = 1

    @property
    def labeled(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.x[self.split.labeled], self.data.y[self.split.labeled]

    @property
    def batch_size(self) -> int:
        """The global batch: the recipe's batch size per replica, times the replicas."""
        return self.recipe.batch_size * self.replicas

    @property
    def steps_per_epoch(self) -> int:
        return runs.steps_per_epoch(len(self.split.labeled), self.batch_size)

    def steps(self, stage: Stage) -> int:
        return stage.epochs * self.steps_per_epoch

    def stage_lr(self, stage: Stage) -> float:
        return self.recipe.lr if stage.top == 0 else self.recipe.lr * self.recipe.finetune_lr_factor


def plan_finetune(recipe: Recipe, replicas: int = 1) -> Plan:
    """Check the settings, load and split the data, build the classifier and its stages; train nothing."""
    if not recipe.from_ and not recipe.backbone:
        raise SettingsError("finetune needs a base: --from DIR (a saved encoder) or --backbone NAME.")
    encoder_manifest = artifacts.read_manifest(recipe.from_, ("encoder",)) if recipe.from_ else None
    data = load_data(recipe.data, image_size=recipe.image_size)
    runs.require_labels(data)
    split = _split_for(recipe, data, encoder_manifest)
    keras.utils.set_random_seed(recipe.seed)
    runs.make_optimizer(recipe, 1e-3)  # fail early on a bad name
    clf = build_classifier(recipe, data, encoder_manifest)
    return Plan(recipe, data, split, clf, plan_stages(recipe, clf.blocks), runs.out_dir(recipe, "classifier"),
                replicas)


def run_finetune(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Build the classifier, train it stage by stage, test it, save it."""
    runs.check_out_writable(runs.out_dir(recipe, "classifier"))
    with runs.training_context(recipe) as strategy:
        return _train(plan_finetune(recipe, strategy.num_replicas_in_sync), verbose)


def _train(plan: Plan, verbose: bool) -> runs.Result:
    recipe = plan.recipe
    data, split, clf, stages, out = plan.data, plan.split, plan.clf, plan.stages, plan.out
    x, y = plan.labeled
    x_val, y_val = data.x[split.val], data.y[split.val]
    runs.print_line(f"finetune: {clf.info['description']} on {len(x)} labeled examples "
                    f"({recipe.label_fraction:g} of {len(split.train)}), {data.num_classes} classes; "
                    f"stages {describe(stages)}", verbose)

    backup = Backup.for_output(out, recipe.run_settings())
    state = backup.state(restart=recipe.restart)
    resume_at = state["epoch"] if state else 0
    history: dict[str, list[float]] = dict(state["history"]) if state else {}
    if state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {resume_at + 1} "
                        f"of {sum(s.epochs for s in stages)}", verbose)
    features: dict[str, Any] = {}
    seconds: list[float] = []
    stage_lrs: list[float | None] = []
    epoch = 0
    trained = clf.model
    loss, accuracy = "sparse_categorical_crossentropy", ["accuracy"]
    for index, stage in enumerate(stages):
        start, epoch = epoch, epoch + stage.epochs
        if epoch <= resume_at:  # finished before the interruption
            stage_lrs.append(None)
            seconds.append(0.0)
            continue
        unfrozen = freeze_all_but_top(clf.base, clf.blocks, stage.top, recipe.train_batchnorm)
        factors = _lr_factors(clf.blocks, stage.top, recipe.lr_decay)
        cached = stage.top == 0 and recipe.cache_features and plan.replicas == 1 and can_cache(clf.features)
        trained = clf.head if cached else clf.model
        started = time.perf_counter()
        if state and start <= resume_at:  # the weights the interrupted run had at resume_at
            backup.load_weights(clf.model)
        if cached and not features:
            features.update(train=compute_features(clf.features, x, plan.batch_size),
                            val=compute_features(clf.features, x_val, plan.batch_size) if len(x_val) else None)
        inputs = features if cached else {"train": x, "val": x_val if len(x_val) else None}
        if recipe.lr == "auto":
            trained.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
            lr = runs.find_learning_rate(trained, inputs["train"], y, recipe, verbose)
        else:
            lr = plan.stage_lr(stage)
        callbacks = runs.compile_stage(trained, recipe, lr, plan.steps(stage), loss, accuracy, lr_factors=factors)
        if state and start < resume_at:  # mid-stage: the optimizer's state too (its step drives the schedule)
            backup.restore(clf.model, trained)
        first = max(start, resume_at)
        runs.print_line(f"stage {stage.name}: epochs {first + 1}-{epoch}, {recipe.schedule} learning "
                        f"rate {lr:.3g}{', on cached base outputs' if cached else ''}; trainable: "
                        f"{', '.join(unfrozen) or 'no block'} + head", verbose)
        runs.print_line(format_audit(audit(clf.model, factors)), verbose)
        keep = BackupCallback(backup, clf.model, index, history, recipe.backup_every,
                              final_epoch=sum(s.epochs for s in stages))
        health = [TrainingHealth(pipeline(inputs["train"], y, plan.batch_size), every=recipe.health_steps,
                                 log_dir=recipe.tensorboard, initial_step=first * plan.steps_per_epoch)
                  ] if recipe.health_steps else []
        fit = trained.fit(
            pipeline(inputs["train"], y, plan.batch_size, shuffle=True, seed=recipe.seed),
            validation_data=None if inputs["val"] is None else pipeline(inputs["val"], y_val, plan.batch_size),
            initial_epoch=first, epochs=epoch, callbacks=[*callbacks, StopOnNaN(stage.name), keep, *health],
            shuffle=False, verbose=2 if verbose else 0)
        stage_lrs.append(lr)
        runs.merge_history(history, fit)
        seconds.append(time.perf_counter() - started)

    if not stages or trained is not clf.model:  # the last stage trained the head on cached features
        clf.model.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
    test_loss, test_accuracy = clf.model.evaluate(
        pipeline(data.x[split.test], data.y[split.test], plan.batch_size), verbose=0)
    metrics = {"test_accuracy": float(test_accuracy), "test_loss": float(test_loss)}
    manifest = runs.base_manifest("classifier", recipe, data, split)
    manifest.update(
        num_classes=data.num_classes,
        base=clf.info,
        blocks=[name for name, _ in clf.blocks],
        stages=[{"name": s.name, "unfreeze_top": s.top, "epochs": s.epochs, "lr": lr, "schedule": recipe.schedule,
                 "seconds": round(t, 3)} for s, lr, t in zip(stages, stage_lrs, seconds)],
        metrics=metrics,
    )
    runs.save_run(out, clf.model, recipe, manifest, split, history)
    backup.discard()
    runs.print_line(f"test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(split.test)} "
                    f"held-out examples; classifier saved to {out}", verbose)
    return runs.Result(model=clf.model, history=history, metrics=metrics, artifact=out, manifest=manifest)


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` as it was saved, or a copy with its weights whose layers compute under `policy` (mixed precision)."""
    if policy == "float32":
        return model

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def plan_stages(recipe: Recipe, blocks: Blocks) -> list[Stage]:
    """The stages the recipe asks for: a schedule, gradual unfreezing, or head then top N."""
    if recipe.unfreeze_schedule:
        return parse_stages(recipe.unfreeze_schedule, len(blocks))
    if recipe.unfreeze_top > len(blocks):
        raise SettingsError(
            f"--unfreeze-top {recipe.unfreeze_top} is more than the base has blocks: it has {len(blocks)} "
            f"({', '.join(name for name, _ in blocks)})."
        )
    if recipe.gradual:
        return gradual_stages(recipe.head_epochs, recipe.epochs, len(blocks), recipe.unfreeze_top)
    return two_stages(recipe.head_epochs, recipe.unfreeze_top, recipe.epochs, len(blocks))


def _lr_factors(blocks: Blocks, top: int, lr_decay: float) -> dict[str, float]:
    """Per-variable factors of discriminative fine-tuning, or {} when every rate is the same."""
    if lr_decay == 1 or top < 2:
        return {}
    per_block = block_factors(blocks[len(blocks) - top:], lr_decay)
    return {path: b["factor"] for b in per_block.values() for path in b["paths"]}


def build_classifier(recipe: Recipe, data: Data, encoder_manifest: dict[str, Any] | None) -> Classifier:
    """inputs → (adapter) → base → pooling → (dropout) → softmax head."""
    inputs = keras.Input(data.input_shape, name="inputs")
    if encoder_manifest is not None:
        if tuple(encoder_manifest["input_shape"]) != data.input_shape:
            raise SettingsError(
                f"The data's inputs have shape {data.input_shape}, but the encoder in {recipe.from_!r} "
                f"takes {tuple(encoder_manifest['input_shape'])}."
            )
        base = with_dtype_policy(artifacts.load_model(recipe.from_), recipe.precision)
        x = base(inputs)
        blocks = blocks_of(base)
        info = {"from": str(recipe.from_), "kind": "encoder", "description": f"encoder {recipe.from_}"}
    else:
        entry = get_backbone(recipe.backbone)
        if len(data.input_shape) != 3:
            raise SettingsError(f"Backbone {recipe.backbone!r} takes images; the data's inputs have shape "
                                f"{data.input_shape}.")
        side = backbone_input_size(entry, *data.input_shape[:2], recipe.image_size)
        x = image_adapter(inputs, data.value_range, side, entry.preprocess)
        base = build_backbone(recipe.backbone, recipe.weights, (side, side, 3))
        x = base(x)
        blocks = blocks_of(base, entry.blocks)
        info = {"backbone": recipe.backbone, "weights": recipe.weights, "input_side": side,
                "preprocess": entry.preprocess, "kind": "backbone",
                "description": f"{recipe.backbone} (weights {recipe.weights}) at {side}x{side}"}
    head_layers = []
    if len(x.shape) == 4:
        head_layers.append(keras.layers.GlobalAveragePooling2D(name="pool"))
    elif len(x.shape) > 2:
        head_layers.append(keras.layers.Flatten(name="flatten"))
    if recipe.dropout:
        kind = setup_for(encoder_manifest["activation"]).dropout if encoder_manifest else "plain"
        head_layers.append(dropout_layer(recipe.dropout, kind, recipe.mc_dropout, name="head_dropout"))
    head_layers.append(keras.layers.Dense(data.num_classes, activation="softmax", dtype="float32", name="head"))
    features_in = keras.Input(x.shape[1:], name="features")
    outputs, head_out = x, features_in
    for layer in head_layers:
        outputs, head_out = layer(outputs), layer(head_out)
    return Classifier(model=keras.Model(inputs, outputs, name="classifier"), base=base, blocks=blocks,
                      features=keras.Model(inputs, x, name="features"),
                      head=keras.Model(features_in, head_out, name="head_on_features"), info=info)


def _split_for(recipe: Recipe, data: Data, encoder_manifest: dict[str, Any] | None) -> Split:
    """The split; on the encoder's own data, the encoder's split, so its test examples stay unseen."""
    same_data = encoder_manifest is not None and encoder_manifest["data"]["fingerprint"] == data.fingerprint
    seed = recipe.resolved_split_seed
    if same_data and recipe.split_seed is None:
        seed = int(encoder_manifest["split"]["seed"])
    split = split_data(data, seed=seed, test_fraction=recipe.test_fraction, val_fraction=recipe.val_fraction,
                       label_fraction=recipe.label_fraction, label_seed=recipe.seed)
    if same_data:
        pretrained_on = np.asarray(artifacts.read_json(recipe.from_, artifacts.SPLIT)["train"])
        leaked = np.intersect1d(pretrained_on, split.test)
        if len(leaked):
            raise SettingsError(
                f"split seed {seed} puts {len(leaked)} test examples among the encoder's pretraining inputs; "
                f"use the encoder's split seed {encoder_manifest['split']['seed']} (leave --split-seed unset)."
            )
    return split
