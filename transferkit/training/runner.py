"""The stage runner: the one training loop every pipeline's stages go through.

A pipeline (a pretraining task, fine-tuning's head and unfreezing stages, its
semi-supervised phases) describes each stage as a `Stage`: the model to fit,
its batches, loss, learning rate, patience and what a backup keeps. The
runner does the rest, the same way for all of them, as fastai's `fine_tune`
is policy over one `Learner.fit`:

1. skips a stage the interrupted run had finished; gives the model the
   backed-up weights when the run resumes in or after it;
2. `lr="auto"`: the LR finder's valley on the stage's data;
3. compiles with the recipe's optimizer and schedule (`compile_stage`);
   a stage resumed part-way gets its optimizer and random states back;
4. trains under the divergence stop and early stopping with the best epoch's
   weights (the guards), training health, TensorBoard curves and
   backups (`BackupCallback`, which owns resume as Keras's `BackupAndRestore`);
5. appends the epochs to the run's history.

Example:

>>> run = Run(recipe, backup=None, state=None, verbose=False, total_epochs=5)        # doctest: +SKIP
>>> done = fit_stage(run, Stage("head", model, batches, loss="mse", start=0, end=5,
...                             learning_rate=1e-3, patience=2, validated=False))   # doctest: +SKIP
>>> done.learning_rate, run.history["loss"][-1]                                     # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import keras

from transferkit.data.pipelines import learning_rate_data  # noqa: F401 - part of this module's interface (lr-find uses it)
from transferkit.pieces.callbacks import ResumableEarlyStopping, StopOnDivergence
from transferkit.pieces.health import TrainingHealth
from transferkit.recipe import Recipe
from transferkit.store.backup import Backup, BackupCallback, Kept, random_state
from transferkit.training.compiling import compile_stage, schedule_options  # noqa: F401 - part of this module's interface
from transferkit.training.defaults import ONECYCLE_JUDGED_FROM
from transferkit.training.runs import print_line
from transferkit.training.runtime import is_chief


@dataclasses.dataclass
class Run:
    """One run across its stages: its recipe, backup, the interrupted run's state, and the history so far.

    `total_epochs` is the run's last epoch (its backup is superseded by the
    artifact). `history` starts as the interrupted run's and grows with each stage.
    """

    recipe: Recipe
    backup: Backup | None
    state: dict[str, Any] | None
    verbose: bool
    total_epochs: int
    history: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    restored_from: int | None = dataclasses.field(default=None, init=False)  # the stage start last restored for

    def __post_init__(self) -> None:
        if self.state and not self.history:
            self.history = {k: list(v) for k, v in self.state["history"].items()}

    @property
    def resume_at(self) -> int:
        """The epoch the interrupted run stopped in (0 when not continuing one)."""
        return int(self.state["epoch"]) if self.state else 0

    def finished_before(self, end: int) -> bool:
        """Whether the run's epochs up to `end` were trained before the interruption."""
        return self.state is not None and end <= self.resume_at

    def restore_weights(self, kept: Kept, start: int, head: Kept = None) -> bool:
        """Give `kept` (and `head`) the backed-up weights if the run resumes at or after epoch `start`.

        Once per stage: a policy that needs them before the stage (pseudo-labels, the codes of the
        blocks below) restores them first, and `fit_stage` does not read the backup again.
        """
        if not self.state or start > self.resume_at:
            return False
        if self.restored_from != start:
            self.backup.load_weights(kept, head)
            self.restored_from = start
        return True

    def resumes_in(self, index: int) -> bool:
        """Whether the backup was made while stage `index` trained (its optimizer state is in it)."""
        return bool(self.state) and self.state["stage"] == index


@dataclasses.dataclass
class Stage:
    """One stage: what to fit, on what, how, and what its backups keep.

    Args:
        name: String. Its name in messages and errors ("head", "pretrain rotation").
        model: The Keras model `fit` runs on.
        train: A tf.data dataset of batches, or a callable `first_epoch -> dataset` for
            data whose order depends on the epoch (see `pretraining.job.epoch_batches`).
        start, end: Ints. The run's epochs `start + 1`..`end` are this stage's.
        batches_per_epoch: Int. Optimizer steps per epoch (the schedule spans them all).
        continuous: Bool. `train` is one dataset for all the epochs (`fit` takes
            `batches_per_epoch` from it per epoch) rather than one pass per epoch.
        index: Int. The stage's number in the run's backups.
        loss, metrics: What to compile with. With `compile=False` the model is already compiled.
        learning_rate: Float or `"auto"` (the LR finder on `lr_data`: what it sweeps, made by
            `data.pipelines.learning_rate_data`).
        patience: Int. Early stopping's patience (0: off); `validated` picks `val_loss` over `loss`.
        loss_floor: Float. The divergence bound is at least 10 times this (a classifier: ln(classes)).
        retrains: Bool. The stage trains again weights the run has already trained (a semi-supervised
            phase's repeat of the last stage): its early stopping judges it from its start.
        validation: A dataset of validation batches, or `None`.
        lr_factors, ema: Per-variable rate factors; the weights' moving-average decay.
        kept, head, training: What a backup keeps (see `BackupCallback`): by default `model`'s
            weights and `model.optimizer`; `training` also names what comes back mid-stage.
        random_state: Bool. The default `training` also keeps `model`'s random seed states
            (noise, dropout), so a resumed run draws what an uninterrupted one would.
        epoch_values: Entries the history gets at every epoch (such as the block).
        class_weight: Per-class loss weights for `fit`.
        unshuffled: The training batches in a fixed order, for training-health checks, or a function
            that makes them (called only when the checks are on). Default: `train`.
        guards: Callbacks instead of the divergence stop and early stopping (e.g. NaN only).
        on_compiled: Called with the learning rate once the model is compiled (to print the stage).
    """

    name: str
    model: keras.Model
    train: Any
    start: int
    end: int
    batches_per_epoch: int
    continuous: bool = False
    index: int = 0
    loss: Any = None
    metrics: list | None = None
    learning_rate: float | str | None = None
    lr_data: tuple[Any, Any] | None = None
    patience: int = 0
    loss_floor: float = 0.0
    retrains: bool = False
    validated: bool = False
    validation: Any = None
    compile: bool = True
    lr_factors: dict[str, float] | None = None
    ema: float | None = None
    kept: Kept = None
    head: Kept = None
    training: Kept = None
    random_state: bool = False
    epoch_values: dict[str, float] | None = None
    class_weight: dict[int, float] | None = None
    unshuffled: Any = None
    guards: list | None = None
    on_compiled: Callable[[float], None] | None = None


@dataclasses.dataclass
class Done:
    """What a stage ended with: its learning rate, early stopping (if any), and the epochs it trained."""

    learning_rate: float | None
    stopping: Any
    first: int
    epochs: int


def fit_stage(run: Run, stage: Stage) -> Done:
    """Train `stage` as part of `run` (see the module's docstring); the run's history grows in place.

    What the runner decides comes first: the stage's first epoch, the epoch its
    early stopping judges from, whether the backup was made inside it. Then the
    work, in the order it must happen: the backed-up weights (before the LR
    finder), the compile, the guards, the training state (after the compile, as
    the optimizer's variables exist only then) and backups, training health, `fit`.

    The guards: the divergence stop, then early stopping with the best weights
    (placed before any callback that saves). Early stopping watches `val_loss`
    when the stage is `validated` (a validation set it can judge on), else the
    training `loss`; `patience` 0 turns it off. With `ema` the best weights it
    keeps are the optimizer's moving average; the epochs before `judged_from`
    neither count towards the patience nor give the best weights (Keras's
    `start_from_epoch`). `stage.guards` replaces them (e.g. NaN only).
    """
    recipe = run.recipe
    kept = stage.model if stage.kept is None else stage.kept
    first = max(stage.start, run.resume_at)
    judged = judged_from(stage, recipe)
    resumes = run.backup is not None and run.resumes_in(stage.index)  # part-way through it: its training state too
    tensorboard = curves(recipe)
    run.restore_weights(kept, stage.start, stage.head)
    lr, schedule = None, []
    if stage.compile:
        lr, schedule = compile_stage(stage.model, recipe, stage.learning_rate,
                                     (stage.end - stage.start) * stage.batches_per_epoch, stage.loss, stage.metrics,
                                     lr_factors=stage.lr_factors, ema=stage.ema, lr_data=stage.lr_data,
                                     verbose=run.verbose)
    if stage.on_compiled is not None:
        stage.on_compiled(lr)
    if stage.guards is not None:
        guards, stopping = list(stage.guards), None
    else:
        stopping = None if not stage.patience else ResumableEarlyStopping(
            monitor="val_loss" if stage.validated else "loss", patience=stage.patience, ema=bool(stage.ema),
            start_from_epoch=judged)
        guards = [StopOnDivergence(stage.name, learning_rate=lr, floor=stage.loss_floor)]
        guards += [stopping] if stopping is not None else []
    training = stage.training
    if training is None:
        if not stage.model.optimizer.built:
            stage.model.optimizer.build(stage.model.trainable_variables)
        training = [stage.model.optimizer, *(random_state(stage.model) if stage.random_state else [])]
    callbacks = [*schedule, *guards]
    if resumes:
        run.backup.restore_training(training, stopping)
    if run.backup is not None:
        callbacks.append(BackupCallback(run.backup, kept, stage.index, run.history, recipe.backup_every,
                                        final_epoch=run.total_epochs, training=training, head=stage.head,
                                        stopping=stopping, epoch_values=stage.epoch_values))
    train = stage.train(first) if callable(stage.train) else stage.train
    if recipe.health_steps:
        unshuffled = train if stage.unshuffled is None else stage.unshuffled
        unshuffled = unshuffled() if callable(unshuffled) else unshuffled
        callbacks.append(TrainingHealth(unshuffled, every=recipe.health_steps,
                                        log_dir=recipe.tensorboard if is_chief() else None,
                                        loss=stage.loss, initial_step=first * stage.batches_per_epoch))
    fit = stage.model.fit(train, validation_data=stage.validation, initial_epoch=first, epochs=stage.end,
                          steps_per_epoch=stage.batches_per_epoch if stage.continuous else None,
                          callbacks=callbacks + tensorboard, class_weight=stage.class_weight, shuffle=False,
                          verbose=2 if run.verbose else 0)
    for key, values in fit.history.items():
        run.history.setdefault(key, []).extend(float(v) for v in values)
    for key, value in (stage.epoch_values or {}).items():
        column = run.history.setdefault(key, [])
        column.extend([float(value)] * (len(run.history["loss"]) - len(column)))
    if stopping is not None and stopping.stopped_epoch:
        print_line(f"stage {stage.name}: {stopping.monitor} stopped improving; kept epoch "
                   f"{stopping.best_epoch + 1}'s weights", run.verbose)
    return Done(lr, stopping, first, len(fit.history.get("loss", [])))


def judged_from(stage: Stage, recipe: Recipe) -> int:
    """The first epoch of `stage` its early stopping judges: under 1cycle, the stage's middle; else its start.

    A 1cycle stage spends its first quarter warming up to its peak rate and
    only then anneals: its loss at the peak says little of where it ends (fastai
    never stops a 1cycle early). Judged from the middle, where the rate has come
    half way down, the default fine-tuning on the digits gained 0.7 points at 5%
    and 10% labels and 2 at 1% over judging every epoch (5 seeds; README "Defaults").
    A stage that `retrains` starts from the weights the run has trained so far,
    which its first epochs may only lose: it is judged from its start (propagate
    then gained 4 points at 1% labels, 1 at 5% and 10%).
    """
    if stage.compile and recipe.schedule == "onecycle" and not stage.retrains:
        return stage.start + int((stage.end - stage.start) * ONECYCLE_JUDGED_FROM)
    return stage.start


def curves(recipe: Recipe) -> list:
    """Keras's TensorBoard callback writing each stage's training curves to `recipe.tensorboard` (none if unset).

    Across processes, the first writes them.

    Stages continue the epoch count, so the curves of a run follow on one axis.
    """
    if not recipe.tensorboard or not is_chief():
        return []
    return [keras.callbacks.TensorBoard(log_dir=recipe.tensorboard, write_graph=False)]
