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
>>> from transferkit.finetuning.train import run_finetune
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
from transferkit.training import backend, runs
from transferkit.pieces.augment_spec import describe_augment, parse_augment
from transferkit.pieces.augmentation import augment_inputs, mix_batches
from transferkit.pieces.backbones import (
    backbone_input_size, blocks_of, build_backbone, get_backbone, image_adapter,
)
from transferkit.store.backup import Backup, BackupCallback
from transferkit.finetuning.bases import base_blocks, base_inputs, load_body
from transferkit.finetuning.bases import describe as describe_base
from transferkit.finetuning.class_weights import resolve_class_weight
from transferkit.training.defaults import describe_chosen, resolve_finetune
from transferkit.data.sources import Data, Split, as_array, pipeline, split_data
from transferkit.errors import SettingsError
from transferkit.pieces.discriminative import block_factors
from transferkit.finetuning.feature_cache import MEMORY_LIMIT_BYTES, can_cache, compute_features
from transferkit.pieces.freezing import audit, format_audit, freeze_all_but_top
from transferkit.pieces.health import TrainingHealth
from transferkit.pieces.losses import SparseCategoricalCrossentropyWithSmoothing
from transferkit.recipe import Recipe
from transferkit.finetuning.semi_supervised import (
    NEIGHBOURS, SPREAD, check_pool, per_class, pool_epochs, propagate_labels, pseudo_labels, unlabeled_pool,
)
from transferkit.pieces.setups import dropout_layer, setup_for
from transferkit.training.stages import Stage, describe, gradual_stages, parse_stages, two_stages

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


@dataclasses.dataclass(frozen=True)
class Phase:
    """Stages trained on one set of examples: `labeled`, the `propagated` pool, or pseudo-labeling round `pseudoN`."""

    name: str
    stages: list[Stage]

    @property
    def round(self) -> int | None:
        """The round (1-based) of a pseudo-labeling phase `pseudoN`; None for the others."""
        return int(self.name.removeprefix("pseudo")) if self.name.startswith("pseudo") else None


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
    phases: list[Phase] = dataclasses.field(default_factory=list)
    chosen: dict[str, Any] = dataclasses.field(default_factory=dict)  # settings resolved by transferkit.training.defaults
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)  # the run's settings as given (backups)
    class_weight: dict[int, float] | None = None  # per-class loss weights for fit (--class-weight)

    @property
    def labeled(self) -> tuple[np.ndarray, np.ndarray]:
        return self.data.x[self.split.labeled], self.data.y[self.split.labeled]

    @functools.cached_property
    def unlabeled(self) -> np.ndarray:
        """Indices of the training examples whose labels are not used (never validation or test ones)."""
        return unlabeled_pool(self.split.train, self.split.labeled, self.split.test)

    @property
    def batch_size(self) -> int:
        """The global batch: the recipe's batch size per replica, times the replicas."""
        return self.recipe.batch_size * self.replicas

    @property
    def steps_per_epoch(self) -> int:
        return runs.steps_per_epoch(len(self.split.labeled), self.batch_size)

    def steps(self, stage: Stage, phase: Phase | None = None) -> int:
        """The optimizer steps of `stage` (in `phase`; for a pseudo-labeling round, at most)."""
        return stage.epochs * runs.steps_per_epoch(self.examples(phase), self.batch_size)

    def examples(self, phase: Phase | None = None) -> int:
        """How many examples `phase` trains on: the labeled ones, the whole pool, or (at most) labeled + a round's picks."""
        labeled, pool = len(self.split.labeled), len(self.unlabeled)
        if phase is None or phase.name == "labeled":
            return labeled
        if phase.name == "propagated":
            return labeled + pool
        return labeled + min(pool, self.data.num_classes * per_class(pool, phase.round, self.recipe.pseudo_rounds,
                                                                     self.data.num_classes))

    def stage_lr(self, stage: Stage) -> float:
        return self.recipe.lr if stage.top == 0 else self.recipe.lr * self.recipe.finetune_lr_factor


def plan_finetune(recipe: Recipe, replicas: int = 1) -> Plan:
    """Check the settings, load and split the data, build the classifier and its stages; train nothing."""
    if not recipe.from_ and not recipe.backbone and not recipe.base:
        raise SettingsError("finetune needs a base: --from DIR (a saved encoder), --backbone NAME (Keras "
                            "Applications) or --base FILE (a Keras model file).")
    encoder_manifest = artifacts.read_manifest(recipe.from_, ("encoder",)) if recipe.from_ else None
    data = runs.load_recipe_data(recipe)
    runs.require_labels(data)
    if recipe.mixes and len(data.input_shape) != 3:
        raise SettingsError(f"--mixup and --cutmix need image inputs (height, width, channels); the data's inputs "
                            f"have shape {data.input_shape}. Received: mixup={recipe.mixup}, cutmix={recipe.cutmix}")
    split = _split_for(recipe, data, encoder_manifest)
    class_weight = resolve_class_weight(recipe.class_weight, data.y[split.labeled], _class_names(data))
    keras.utils.set_random_seed(recipe.seed)
    runs.make_optimizer(recipe, 1e-3)  # fail early on a bad name
    settings = recipe.run_settings()  # as given: what is chosen from them follows
    clf = build_classifier(recipe, data, encoder_manifest)
    recipe, chosen = resolve_finetune(recipe, len(split.labeled), len(clf.blocks),
                                      "encoder" if clf.info["kind"] == "encoder" else "backbone")
    plan = Plan(recipe, data, split, clf, plan_stages(recipe, clf.blocks), runs.out_dir(recipe, "classifier"),
                replicas, chosen=chosen, settings=settings, class_weight=class_weight)
    check_pool(recipe.semi_supervised, plan.unlabeled)
    plan.phases = plan_phases(plan)
    return plan


def plan_phases(plan: Plan) -> list[Phase]:
    """The stages on the labeled examples, and for semi-supervised runs the stages on the pool.

    pseudo: the stages on the labeled examples, then per round the last stage on
    labeled + pseudo-labeled examples. propagate: the stages on the propagated
    pool, then the last stage on the true labels. A stage on the pool keeps the
    number of steps it has on the labeled examples.
    """
    recipe, stages = plan.recipe, plan.stages
    if recipe.semi_supervised == "none" or not stages:
        return [Phase("labeled", stages)]
    labeled_steps = plan.steps_per_epoch
    pool_steps = runs.steps_per_epoch(len(plan.split.labeled) + len(plan.unlabeled), plan.batch_size)
    on_pool = [dataclasses.replace(s, epochs=pool_epochs(s.epochs, labeled_steps, pool_steps)) for s in stages]
    if recipe.semi_supervised == "pseudo":
        return [Phase("labeled", stages)] + [Phase(f"pseudo{r}", on_pool[-1:])
                                             for r in range(1, recipe.pseudo_rounds + 1)]
    return [Phase("propagated", on_pool), Phase("labeled", stages[-1:])]


def run_finetune(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Build the classifier, train it stage by stage, test it, save it."""
    runs.check_out_writable(runs.out_dir(recipe, "classifier"))
    with runs.training_context(recipe) as strategy:
        return _train(plan_finetune(recipe, strategy.num_replicas_in_sync), verbose)


@dataclasses.dataclass
class Examples:
    """What a phase trains on: rows of the data and their targets (class indices, or probabilities if `soft`)."""

    rows: np.ndarray
    y: np.ndarray
    soft: bool = False


def _train(plan: Plan, verbose: bool) -> runs.Result:
    recipe = plan.recipe
    data, split, clf, out = plan.data, plan.split, plan.clf, plan.out
    total_epochs = sum(s.epochs for phase in plan.phases for s in phase.stages)
    x_val, y_val = data.x[split.val], data.y[split.val]
    semi = recipe.semi_supervised
    # augmented or mixed inputs differ every epoch: no head stage can reuse one pass of the base over them
    random_inputs = bool(parse_augment(recipe.augment)) or recipe.mixes
    runs.print_line(describe_chosen("finetune", plan.chosen), verbose)
    runs.print_line(f"finetune: {clf.info['description']} on {len(split.labeled)} labeled examples "
                    f"({recipe.label_fraction:g} of {len(split.train)}), {data.num_classes} classes; "
                    f"stages {describe(plan.stages)}"
                    + (f"; semi-supervised {semi} on {len(plan.unlabeled)} unlabeled examples"
                       if semi != "none" else ""), verbose)

    backup = Backup.for_output(out, plan.settings)
    state = backup.state(restart=recipe.restart)
    resume_at = state["epoch"] if state else 0
    history: dict[str, list[float]] = dict(state["history"]) if state else {}
    if state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {resume_at + 1} of {total_epochs}",
                        verbose)
    # the base's outputs, per phase (None: validation), while the base's weights stay as they are
    outputs: dict[str | None, Any] = {}
    propagated = graph = None
    if semi == "propagate":  # on the base as given, before any backup
        propagated, graph = _propagate(plan)
    # the graph's features are the first phase's examples, in its order: its first stage may reuse them
    reuse = graph if graph is not None and not state and graph.nbytes <= MEMORY_LIMIT_BYTES else None
    del graph
    done: list[dict[str, Any]] = []
    pseudo_counts: dict[str, int] = {}
    epoch, index = 0, -1
    trained = clf.model
    for phase in plan.phases:
        examples = None
        for stage in phase.stages:
            index += 1
            start, epoch = epoch, epoch + stage.epochs
            record = {"name": stage.name, "phase": phase.name, "unfreeze_top": stage.top, "epochs": stage.epochs,
                      "lr": None, "schedule": recipe.schedule, "seconds": 0.0}
            done.append(record)
            if epoch <= resume_at:  # finished before the interruption
                continue
            unfrozen = freeze_all_but_top(clf.base, clf.blocks, stage.top, recipe.train_batchnorm)
            factors = _lr_factors(clf.blocks, stage.top, recipe.lr_decay)
            cached = (stage.top == 0 and recipe.cache_features and plan.replicas == 1 and not random_inputs
                      and can_cache(clf.features))
            trained = clf.head if cached else clf.model
            started = time.perf_counter()
            if state and start <= resume_at:  # the weights the interrupted run had at resume_at
                backup.load_weights(clf.model, clf.head)
            if examples is None:
                examples = _examples(plan, phase, propagated, backup)
                if phase.round:
                    pseudo_counts[phase.name] = len(examples.rows) - len(split.labeled)
            x, y = data.x[examples.rows], examples.y
            soft = examples.soft or recipe.mixes  # mixed batches mix one-hot targets
            if recipe.mixes and not examples.soft:
                y = np.eye(data.num_classes, dtype="float32")[y]
            y_check = np.eye(data.num_classes, dtype="float32")[y_val] if soft else y_val
            inputs = {"train": x, "val": x_val if len(x_val) else None}
            if cached:
                caching = time.perf_counter()
                if reuse is not None:
                    outputs.setdefault(phase.name, reuse)
                for key, rows in ((phase.name, x), (None, x_val)):
                    if key not in outputs:
                        outputs[key] = compute_features(clf.features, rows, plan.batch_size) if len(rows) else None
                inputs = {"train": outputs[phase.name], "val": outputs[None]}
                record["caching_seconds"] = round(time.perf_counter() - caching, 3)
                if index == 0 and isinstance(inputs["train"], np.ndarray):
                    warn_if_constant(inputs["train"], clf.info["description"])
            reuse = None  # used by the first stage, or not at all: free it
            loss, accuracy = _loss_and_metric(soft, recipe.label_smoothing)
            if recipe.lr == "auto":
                trained.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
                lr = runs.find_learning_rate(trained, inputs["train"], y, recipe, verbose)
            else:
                lr = plan.stage_lr(stage)
            per_epoch = runs.steps_per_epoch(len(y), plan.batch_size)
            steps = stage.epochs * per_epoch
            callbacks = runs.compile_stage(trained, recipe, lr, steps, loss, accuracy, lr_factors=factors,
                                           ema=recipe.ema)
            if state and start < resume_at:  # mid-stage: the optimizer's state too (its step drives the schedule)
                backup.restore(clf.model, trained, clf.head)
            first = max(start, resume_at)
            uncached_for_augment = stage.top == 0 and recipe.cache_features and random_inputs
            record["cached"] = bool(cached)
            runs.print_line(f"stage {stage.name}{'' if phase.name == 'labeled' else f' ({phase.name})'}: epochs "
                            f"{first + 1}-{epoch} on {len(y)} examples, {recipe.schedule} learning rate {lr:.3g}"
                            f"{', on cached base outputs' if cached else ''}"
                            f"{', uncached: its inputs change every epoch' if uncached_for_augment else ''}; trainable: "
                            f"{', '.join(unfrozen) or 'no block'} + head", verbose)
            runs.print_line(format_audit(audit(clf.model, factors, clf.blocks)), verbose)
            guards, stopping = runs.stage_guards(
                stage.name if phase.name == "labeled" else f"{stage.name} ({phase.name})",
                recipe.head_stage_patience if stage.top == 0 else recipe.patience,
                # val_loss where validation has an example of every class; else the training loss
                validated=len(x_val) >= data.num_classes, learning_rate=lr, ema=bool(recipe.ema))
            if stopping is not None and state and start < resume_at:
                stopping.load_state(backup.stopping())
            keep = BackupCallback(backup, clf.model, index, history, recipe.backup_every, final_epoch=total_epochs,
                                  head=clf.head if cached else None, stopping=stopping)
            health = [TrainingHealth(pipeline(inputs["train"], y, plan.batch_size), every=recipe.health_steps,
                                     log_dir=recipe.tensorboard, initial_step=first * per_epoch)
                      ] if recipe.health_steps else []
            backend.build_compiled(trained, pipeline(inputs["train"], y, plan.batch_size))
            batches = pipeline(inputs["train"], y, plan.batch_size, shuffle=True, seed=recipe.seed)
            fit = trained.fit(
                mix_batches(batches, recipe.mixup, recipe.cutmix, seed=recipe.seed + index) if recipe.mixes
                else batches,
                validation_data=None if inputs["val"] is None else pipeline(inputs["val"], y_check, plan.batch_size),
                initial_epoch=first, epochs=epoch,
                callbacks=[*callbacks, *guards, keep, *health, *runs.curves(recipe)], class_weight=plan.class_weight,
                shuffle=False, verbose=2 if verbose else 0)
            runs.merge_history(history, fit)
            if stage.top:  # the base has trained: a later head stage needs its new outputs
                outputs.clear()
            record.update(lr=lr, seconds=round(time.perf_counter() - started, 3))
            if stopping is not None and stopping.stopped_epoch:
                record.update(stopped_after=stopping.stopped_epoch + 1, best_epoch=stopping.best_epoch + 1)
                runs.print_line(f"stage {stage.name}: {stopping.monitor} stopped improving; kept epoch "
                                f"{stopping.best_epoch + 1}'s weights", verbose)

    loss, accuracy = _loss_and_metric(soft=False, label_smoothing=recipe.label_smoothing)
    # the last stage trained the head alone, or on soft labels: compile the classifier for the true labels
    if trained is not clf.model or getattr(clf.model, "loss", None) != loss:
        clf.model.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
    test_loss, test_accuracy = clf.model.evaluate(
        pipeline(data.x[split.test], data.y[split.test], plan.batch_size), verbose=0)
    metrics = {"test_accuracy": float(test_accuracy), "test_loss": float(test_loss)}
    manifest = runs.base_manifest("classifier", recipe, data, split)
    manifest.update(
        num_classes=data.num_classes,
        base=clf.info,
        blocks=[name for name, _ in clf.blocks],
        stages=done,
        semi_supervised=_semi_record(plan, pseudo_counts),
        augment=describe_augment(parse_augment(recipe.augment)),
        mixup=recipe.mixup,
        cutmix=recipe.cutmix,
        class_weight=_class_weight_record(plan),
        ema=recipe.ema,
        metrics=metrics,
    )
    runs.save_run(out, clf.model, recipe, manifest, split, history)
    backup.discard()
    runs.print_line(f"test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(split.test)} "
                    f"held-out examples; classifier saved to {out}", verbose)
    return runs.Result(model=clf.model, history=history, metrics=metrics, artifact=out, manifest=manifest)


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


def _loss_and_metric(soft: bool, label_smoothing: float = 0.0) -> tuple[Any, list]:
    """Cross-entropy on class indices, or on probabilities, smoothed by `label_smoothing`; the metric: `accuracy`."""
    if soft:
        loss = keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing) if label_smoothing \
            else "categorical_crossentropy"
        return loss, [keras.metrics.CategoricalAccuracy(name="accuracy")]
    if label_smoothing:
        return SparseCategoricalCrossentropyWithSmoothing(label_smoothing), ["accuracy"]
    return "sparse_categorical_crossentropy", ["accuracy"]


def _class_names(data: Data) -> list[str]:
    """The classes' names in index order: the data's, else the class numbers as text."""
    return [str(n) for n in data.class_names] if data.class_names else [str(i) for i in range(data.num_classes)]


def _class_weight_record(plan: Plan) -> dict[str, Any]:
    """What the manifest says of the class weights: the setting, and each class's weight by name."""
    weights = plan.class_weight
    names = _class_names(plan.data)
    return {"setting": plan.recipe.class_weight,
            "weights": None if weights is None else {names[c]: w for c, w in sorted(weights.items())}}


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
        probs = plan.clf.model.predict(pipeline(data.x[pool], batch_size=plan.batch_size), verbose=0)
        picked, labels = pseudo_labels(probs, phase.round, recipe.pseudo_rounds, recipe.pseudo_threshold)
        rows = pool[picked]
        backup.folder.mkdir(parents=True, exist_ok=True)
        artifacts.write_json(saved, {"rows": rows.tolist(), "labels": labels.tolist()})
    return Examples(np.concatenate([split.labeled, rows]),
                    np.concatenate([data.y[split.labeled], labels]).astype(data.y.dtype))


def _propagate(plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """LabelSpreading's soft labels for labeled + unlabeled training rows, and the base's outputs it used.

    The raw inputs stand in for the base's outputs (then None) with
    `propagate_on="inputs"` and when the base has no pretrained weights (a
    backbone with `weights="none"`).
    """
    data, split, clf = plan.data, plan.split, plan.clf
    rows = np.concatenate([split.labeled, plan.unlabeled])
    graph = None
    if _graph_on(plan) == "features":
        graph = compute_features(clf.features, data.x[rows], plan.batch_size, limit_bytes=math.inf)
    labels = np.concatenate([data.y[split.labeled], np.full(len(plan.unlabeled), -1)]).astype(np.int64)
    # a graph on the inputs themselves holds them all (decoded, for image files): kNN needs every row at once
    return propagate_labels(as_array(data.x[rows]) if graph is None else graph, labels, data.num_classes), graph


def _graph_on(plan: Plan) -> str:
    """What propagate's kNN graph is built on: the base's features, or the inputs (also for untrained backbones)."""
    untrained = plan.clf.info["kind"] == "backbone" and plan.recipe.weights == "none"
    return "inputs" if untrained else plan.recipe.propagate_on


def _semi_record(plan: Plan, pseudo_counts: dict[str, int]) -> dict[str, Any]:
    """What the artifact says of the unlabeled data it learned from."""
    recipe = plan.recipe
    if recipe.semi_supervised == "none":
        return {"mode": "none"}
    record: dict[str, Any] = {"mode": recipe.semi_supervised, "unlabeled_examples": len(plan.unlabeled),
                              "unlabeled_rows": plan.unlabeled.tolist()}
    if recipe.semi_supervised == "pseudo":
        record.update(rounds=recipe.pseudo_rounds, threshold=recipe.pseudo_threshold, pseudo_labeled=pseudo_counts)
    else:
        record.update(kernel="knn", n_neighbors=NEIGHBOURS, alpha=SPREAD, graph_on=_graph_on(plan))
    return record


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
    """inputs → (adapter) → base → pooling: the features; then (dropout) → softmax: the head.

    The base: the encoder `from_`, the Keras Applications `backbone`, or the body of the model file `base`.
    """
    inputs = keras.Input(data.input_shape, name="inputs")
    augmented = augment_inputs(inputs, recipe.augment, data.value_range)  # `inputs` itself without --augment
    if encoder_manifest is not None:
        if tuple(encoder_manifest["input_shape"]) != data.input_shape:
            raise SettingsError(
                f"The data's inputs have shape {data.input_shape}, but the encoder in {recipe.from_!r} "
                f"takes {tuple(encoder_manifest['input_shape'])}."
            )
        base = with_dtype_policy(artifacts.load_model(recipe.from_), recipe.precision)
        x = base(augmented)
        blocks = blocks_of(base)
        info = {"from": str(recipe.from_), "kind": "encoder", "description": f"encoder {recipe.from_}"}
    elif recipe.base:
        body = load_body(recipe.base, recipe.cut)
        base = with_dtype_policy(body.model, recipe.precision)
        preprocess = recipe.preprocess or "none"
        x = base(base_inputs(augmented, data.value_range, base, preprocess))
        blocks_rule, blocks = base_blocks(base)
        info = describe_base(body, base, preprocess, blocks_rule)
    else:
        entry = get_backbone(recipe.backbone)
        if len(data.input_shape) != 3:
            raise SettingsError(f"Backbone {recipe.backbone!r} takes images; the data's inputs have shape "
                                f"{data.input_shape}.")
        side = backbone_input_size(entry, *data.input_shape[:2], recipe.image_size)
        x = image_adapter(augmented, data.value_range, side, entry.preprocess)
        base = build_backbone(recipe.backbone, recipe.weights, (side, side, 3))
        x = base(x)
        blocks = blocks_of(base, entry.blocks)
        info = {"backbone": recipe.backbone, "weights": recipe.weights, "input_side": side,
                "preprocess": entry.preprocess, "kind": "backbone",
                "description": f"{recipe.backbone} (weights {recipe.weights}) at {side}x{side}"}
    # pooling has no weights: it belongs to the features, so a cached head stage stores the pooled outputs
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(x.shape) > 2:
        x = keras.layers.Flatten(name="flatten")(x)
    head_layers = []
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
