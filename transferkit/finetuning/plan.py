"""The Plan of a fine-tuning run: its data, split, classifier, stages and phases, computed once.

`plan_finetune` checks the settings (for a run that writes, that its output
folder can be written: `Plan.out`), reads and loads the encoder, loads and
splits the data, builds the classifier and resolves the unset settings
(`transferkit.training.defaults`) before any training; the run, `schedule
--plot`, the printed stage headers and the manifest all read the same Plan.

Example:

>>> from transferkit.recipe import Recipe
>>> plan = plan_finetune(Recipe(from_="saved_models/digits-encoder", label_fraction=0.05))   # doctest: +SKIP
>>> [(s.name, s.epochs) for s in plan.stages]                                              # doctest: +SKIP
[('head', 200), ('top3', 100)]
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.training import runs
from transferkit.finetuning.class_weights import class_names, class_weight_record, resolve_class_weight
from transferkit.training.defaults import choose_finetune, describe_chosen
from transferkit.data.sources import Data, Split, load_recipe_data, require_labels, split_data
from transferkit.errors import SettingsError
from transferkit.pieces.discriminative import block_factors
from transferkit.pieces.losses import loss_and_metric
from transferkit.recipe import Recipe
from transferkit.finetuning.semi_supervised import NEIGHBOURS, SPREAD, per_class, pool_epochs, unlabeled_pool
from transferkit.training.stages import Stage, plan_stages
from transferkit.finetuning.classifier import Blocks, Classifier, build_classifier


@dataclasses.dataclass(frozen=True)
class Phase:
    """Stages trained on one set of examples: `labeled`, the `propagated` pool, or pseudo-labeling round `pseudoN`."""

    name: str
    stages: list[Stage]

    @property
    def round(self) -> int | None:
        """The round (1-based) of a pseudo-labeling phase `pseudoN`; None for the others."""
        return int(self.name.removeprefix("pseudo")) if self.name.startswith("pseudo") else None


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """One stage of the run as planned: what its training needs besides its examples and the model.

    `cacheable`: a head stage with nothing random in its inputs, on one replica, with
    `cache_features` on; it trains on cached base outputs if the frozen base is also
    deterministic (`feature_cache.can_cache`, known once the stage has frozen it).
    `uncached`: a head stage that could have been cached but for its inputs, which change
    every epoch (augmented or mixed). `soft`: its targets are probabilities (propagated
    labels, or one-hot targets that mixed batches mix).
    """

    stage: Stage
    phase: Phase
    index: int  # its number in the run, and in the run's backups
    start: int  # it trains the run's epochs start + 1 .. end
    end: int
    learning_rate: float | str  # "auto": the LR finder's valley
    patience: int
    lr_factors: dict[str, float]
    cacheable: bool
    uncached: bool
    soft: bool
    retrains: bool  # a later phase trains again weights the run has trained (judged from its start)
    first_of_phase: bool  # the stage that picks its phase's examples
    loss: Any = None  # what the stage compiles with (`loss_and_metric`)
    metrics: list | None = None

    @property
    def top(self) -> int:
        return self.stage.top

    @property
    def name(self) -> str:
        """Its name in messages: the stage's, and the phase's unless that is the labeled examples."""
        return self.stage.name if self.phase.name == "labeled" else f"{self.stage.name} ({self.phase.name})"


@dataclasses.dataclass
class Plan:
    """Everything a fine-tuning run is made of, before any training."""

    recipe: Recipe
    data: Data
    split: Split
    clf: Classifier
    stages: list[Stage]
    replicas: int = 1
    phases: list[Phase] = dataclasses.field(default_factory=list)
    chosen: dict[str, Any] = dataclasses.field(default_factory=dict)  # settings resolved by transferkit.training.defaults
    chosen_line: str = ""  # the line the run prints first: what was chosen, as flags (`describe_chosen`)
    class_weight: dict[int, float] | None = None  # per-class loss weights for fit (--class-weight)
    stage_plans: list[StagePlan] = dataclasses.field(default_factory=list)  # every phase's stages, in order
    augment: str = "none"  # the augmentation's canonical spec (`Augmentation.spec`)
    record: dict[str, Any] = dataclasses.field(default_factory=dict)  # what the manifest says before training
    test_loss: tuple[Any, list] | None = None  # the loss and metric of the true labels, for the test
    semi_record: dict[str, Any] = dataclasses.field(default_factory=dict)  # the manifest's `semi_supervised`
    recipe_text: str = ""  # the recipe as TOML, for the artifact (`Recipe.to_toml`)
    out: Path | None = None  # where the run saves the classifier (None: a plan made only to be read)

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

    @property
    def random_inputs(self) -> bool:
        """Augmented or mixed inputs differ every epoch: no head stage can reuse one pass of the base over them."""
        return self.augment != "none" or self.recipe.mixes

    @property
    def total_epochs(self) -> int:
        return sum(s.epochs for phase in self.phases for s in phase.stages)

    @property
    def graph_on(self) -> str:
        """What propagate's kNN graph is built on: the base's features, or the inputs (also for untrained backbones)."""
        untrained = self.clf.info["kind"] == "backbone" and self.recipe.weights == "none"
        return "inputs" if untrained else self.recipe.propagate_on


def plan_finetune(recipe: Recipe, replicas: int = 1, writes: bool = False) -> Plan:
    """Check the settings, load and split the data, build the classifier and its stages; train nothing.

    `writes`: the plan is for a run that saves the classifier: its folder (`Plan.out`) is chosen first, and
    refused before any work if it cannot be written.
    """
    recipe.check_base()
    keras.utils.set_random_seed(recipe.seed)  # before the encoder is loaded: the classifier's draws follow from it
    out, data, split, encoder = _read(recipe, writes)
    names = class_names(data)
    class_weight = resolve_class_weight(recipe.class_weight, data.y[split.labeled], names)
    weighting = class_weight_record(recipe.class_weight, class_weight, names)
    clf = build_classifier(recipe, data, encoder)  # refuses --augment on inputs that are not images
    chosen = choose_finetune(recipe, len(split.labeled), len(clf.blocks),
                             "encoder" if clf.info["kind"] == "encoder" else "backbone")
    chosen_line = describe_chosen("finetune", chosen)
    recipe = recipe.replace(**chosen)
    recipe_text = recipe.to_toml()  # the artifact's recipe.toml: the recipe as it trains
    stages = plan_stages(recipe, [name for name, _ in clf.blocks])
    test_loss = loss_and_metric(False, recipe.label_smoothing)
    plan = Plan(recipe, data, split, clf, stages, replicas, chosen=chosen, chosen_line=chosen_line,
                class_weight=class_weight, augment=clf.augment, test_loss=test_loss,
                recipe_text=recipe_text, out=out)
    if recipe.semi_supervised != "none" and not len(plan.unlabeled):  # a semi-supervised mode needs the pool
        raise SettingsError(f"--semi-supervised {recipe.semi_supervised} needs unlabeled training examples, but "
                            "every training example is labeled; use a --label-fraction below 1.")
    plan.record = {"num_classes": data.num_classes, "base": clf.info, "blocks": [name for name, _ in clf.blocks],
                   "augment": clf.augment, "mixup": recipe.mixup, "cutmix": recipe.cutmix,
                   "class_weight": weighting, "ema": recipe.ema}
    plan.semi_record = semi_record(plan)
    plan.phases = plan_phases(plan)
    plan.stage_plans = plan_stage_plans(plan)
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


def plan_stage_plans(plan: Plan) -> list[StagePlan]:
    """Every phase's stages in the order they train, each with its epochs, rate, patience and rate factors."""
    recipe, planned, end = plan.recipe, [], 0
    cache = recipe.cache_features and plan.replicas == 1
    for phase in plan.phases:
        for position, stage in enumerate(phase.stages):
            start, end = end, end + stage.epochs
            soft = phase.name == "propagated" or recipe.mixes
            loss, metrics = loss_and_metric(soft, recipe.label_smoothing)
            planned.append(StagePlan(
                stage, phase, len(planned), start, end,
                learning_rate="auto" if recipe.lr == "auto" else plan.stage_lr(stage),
                patience=recipe.head_stage_patience if stage.top == 0 else recipe.patience,
                lr_factors=lr_factors(plan.clf.blocks, stage.top, recipe.lr_decay),
                cacheable=stage.top == 0 and cache and not plan.random_inputs,
                uncached=stage.top == 0 and recipe.cache_features and plan.random_inputs,
                soft=soft, retrains=phase is not plan.phases[0], first_of_phase=position == 0, loss=loss,
                metrics=metrics))
    return planned


def semi_record(plan: Plan) -> dict[str, Any]:
    """What the artifact says of the unlabeled data it learns from; the run counts each round's pseudo-labels in it."""
    recipe = plan.recipe
    if recipe.semi_supervised == "none":
        return {"mode": "none"}
    record: dict[str, Any] = {"mode": recipe.semi_supervised, "unlabeled_examples": len(plan.unlabeled),
                              "unlabeled_rows": plan.unlabeled.tolist()}
    if recipe.semi_supervised == "pseudo":
        record.update(rounds=recipe.pseudo_rounds, threshold=recipe.pseudo_threshold, pseudo_labeled={})
    else:
        record.update(kernel="knn", n_neighbors=NEIGHBOURS, alpha=SPREAD, graph_on=plan.graph_on,
                      metric="cosine" if plan.graph_on == "features" else "euclidean")
    return record


def lr_factors(blocks: Blocks, top: int, lr_decay: float) -> dict[str, float]:
    """Per-variable factors of discriminative fine-tuning, or {} when every rate is the same."""
    if lr_decay == 1 or top < 2:
        return {}
    per_block = block_factors(blocks[len(blocks) - top:], lr_decay)
    return {path: b["factor"] for b in per_block.values() for path in b["paths"]}


def _read(recipe: Recipe, writes: bool) -> tuple[Path | None, Data, Split, artifacts.Encoder | None]:
    """What the plan reads before it builds anything: the output folder (with `writes`, refused if it cannot be
    written; else None), the encoder, read and loaded (None without `from_`), the labeled data and its split.

    On the encoder's own data, the encoder's split, so its test examples stay unseen. Images reach the size the
    encoder takes unless `image_size` is set; files that cannot be decoded are skipped if its pretraining skipped
    some (as `evaluate` and `predict` do).
    """
    out = artifacts.out_dir(recipe, "classifier") if writes else None
    if out is not None:
        artifacts.check_out_writable(out)
    encoder = artifacts.read_encoder(recipe.from_) if recipe.from_ else None
    size = encoder.manifest.input_size if encoder is not None else None
    skipped = encoder is not None and bool(encoder.manifest.data.skipped)
    data = load_recipe_data(recipe, image_size=size, skip_bad_files=skipped)
    require_labels(data)
    if recipe.mixes and len(data.input_shape) != 3:
        raise SettingsError(f"--mixup and --cutmix need image inputs (height, width, channels); the data's inputs "
                            f"have shape {data.input_shape}. Received: mixup={recipe.mixup}, cutmix={recipe.cutmix}")
    same_data = encoder is not None and encoder.manifest.data.fingerprint == data.fingerprint
    seed = recipe.resolved_split_seed
    if same_data and recipe.split_seed is None:
        seed = int(encoder.manifest.split.seed)
    split = split_data(data, seed=seed, test_fraction=recipe.test_fraction, val_fraction=recipe.val_fraction,
                       label_fraction=recipe.label_fraction, label_seed=recipe.seed)
    if same_data:
        if encoder.pretrained_on is None:
            raise SettingsError(f"{str(encoder.path)!r} holds no {artifacts.SPLIT}, which fine-tuning on the "
                                f"encoder's own data checks its test examples against; expected an encoder folder "
                                f"written by transferkit pretrain.")
        leaked = np.intersect1d(np.asarray(encoder.pretrained_on), split.test)
        if len(leaked):
            raise SettingsError(
                f"split seed {seed} puts {len(leaked)} test examples among the encoder's pretraining inputs; "
                f"use the encoder's split seed {encoder.manifest.split.seed} (leave --split-seed unset)."
            )
    return out, data, split, encoder
