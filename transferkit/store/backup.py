"""Backups that let a killed fine-tuning or pretraining run continue where it stopped.

At every epoch end (and every `backup_every` steps) the run's state goes to a
hidden sibling of its output folder, `.NAME.backup/`: the model's weights
(`weights.npz`), its training state (`optimizer.npz`: the optimizer's
variables; pretraining adds a second optimizer's and the random seed states),
the stage, the next epoch and the history so far. Each file is written to a
temporary name and renamed into place, the state last, so a kill at any moment
leaves the previous backup whole. The run's start (its first stage, before its
first epoch) is backed up as a state alone: the weights and training state it
starts from are those its recipe builds (the seed, the saved base), so
continuing from it is starting afresh. Across processes (`--strategy multiworker`)
the first writes it and every process reads it: resuming there needs the
output folder on a file system they share. Running the same command again continues
from it; a backup made with other settings is refused (or discarded with
`restart`).

Example:

>>> backup = Backup.for_output("saved_models/digits-classifier")   # doctest: +SKIP
>>> backup.state()                                                  # doctest: +SKIP
{'stage': 1, 'epoch': 7, ...}
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.errors import SettingsError
from transferkit.training.runtime import is_chief

STATE = "state.json"
WEIGHTS = "weights.npz"
HEAD = "head.npz"  # a stage on cached base outputs: the head's weights, over WEIGHTS written at its start
OPTIMIZER = "optimizer.npz"
STOPPING = "stopping.npz"  # early stopping's best weights so far

# what a backup keeps: a model (its weights), an optimizer (its variables), a variable, or a list of them
Kept = Any


class Backup:
    """The backup folder of one run."""

    def __init__(self, folder: str | Path, settings: dict[str, Any]):
        self.folder = Path(folder)
        self.settings = settings

    @classmethod
    def for_output(cls, out: str | Path, settings: dict[str, Any]) -> "Backup":
        out = Path(out)
        return cls(out.with_name(f".{out.name}.backup"), settings)

    def state(self, restart: bool = False) -> dict[str, Any] | None:
        """The saved state, `None` when there is none or it is the run's start; refuses one made with other settings.

        Across processes, refuses states that differ between them (a folder they do not share).
        """
        from transferkit.training.distributed import same_on_every_process

        state = self._read_state(restart)
        if not same_on_every_process(-1 if state is None else int(state["epoch"])):
            raise SettingsError(f"The processes found different backups in {str(self.folder)!r}: resuming across "
                                "processes needs --out on a file system they all share (or pass --restart).")
        return None if state is not None and state.get("start") else state

    def _read_state(self, restart: bool) -> dict[str, Any] | None:
        path = self.folder / STATE
        if not path.is_file():
            return None
        state = artifacts.read_json(self.folder, STATE)
        if restart:
            self.discard()
            return None
        if state.get("settings") != self.settings:
            changed = sorted(k for k in set(state.get("settings", {})) | set(self.settings)
                             if state.get("settings", {}).get(k) != self.settings.get(k))
            raise SettingsError(
                f"{str(self.folder)!r} holds a backup of a run with other settings ({', '.join(changed)}); "
                "rerun with the same settings to continue it, or pass --restart to discard it."
            )
        return state

    def save(self, model: Kept, optimizer: Kept, stage: int, epoch: int, history: dict[str, list[float]],
             head_only: bool = False, stopping: tuple[dict, list | None] | None = None, start: bool = False) -> None:
        """Write weights, optimizer variables, then the state that points at them, each atomically.

        `model` and `optimizer` are what to keep (see `variables_of`): a model and its optimizer, or lists.
        `head_only`: `model` is the head of a stage whose base cannot change; the whole model's weights
        were written by `save_weights` when the stage began. `stopping`: early stopping's progress
        (`ResumableEarlyStopping.state()`). `start`: the run's start (its first stage, epoch 0), which
        its recipe rebuilds: the state alone, which `state()` reads as no backup (continuing is starting afresh).
        """
        if not is_chief():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if start:
            artifacts.write_json(self.folder / STATE, {"settings": self.settings, "stage": stage, "epoch": epoch,
                                                       "history": history, "start": True})
            return
        _save_arrays(self.folder / (HEAD if head_only else WEIGHTS), variables_of(model))
        _save_arrays(self.folder / OPTIMIZER, variables_of(optimizer))
        values = None
        if stopping is not None:
            values, best_weights = stopping
            _save_values(self.folder / STOPPING, best_weights or [])
        artifacts.write_json(self.folder / STATE, {"settings": self.settings, "stage": stage, "epoch": epoch,
                                                   "history": history, "head_only": head_only,
                                                   "stopping": values})

    def stopping(self) -> tuple[dict, list | None] | None:
        """Early stopping's progress as saved (see `ResumableEarlyStopping.load_state`), None if none was."""
        values = artifacts.read_json(self.folder, STATE).get("stopping")
        if values is None:
            return None
        with np.load(self.folder / STOPPING) as saved:
            weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        return values, weights or None

    def save_weights(self, model: Kept) -> None:
        """The whole model's weights alone: at the start of a stage whose backups keep only its head."""
        if not is_chief():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        _save_arrays(self.folder / WEIGHTS, variables_of(model))

    def load_weights(self, model: Kept, head: Kept = None) -> None:
        """The saved weights into `model`; into `head` too when the backup kept only the head's last ones."""
        head_only = artifacts.read_json(self.folder, STATE).get("head_only", False)
        if not _load_arrays(self.folder / WEIGHTS, variables_of(model)) or (
                head_only and (head is None or not _load_arrays(self.folder / HEAD, variables_of(head)))):
            raise SettingsError(f"The backup in {str(self.folder)!r} does not fit this model; pass --restart.")

    def restore(self, model: keras.Model, trained: keras.Model, head: keras.Model | None = None) -> None:
        """Load the weights into `model` (and `head`) and the optimizer variables into `trained`'s optimizer."""
        self.load_weights(model, head)
        optimizer = trained.optimizer
        if not optimizer.built:
            optimizer.build(trained.trainable_variables)
        _load_arrays(self.folder / OPTIMIZER, optimizer.variables)

    def restore_training(self, training: Kept, stopping: Any = None) -> None:
        """Load the saved training state into `training` (built optimizers and variables, as saved), and
        early stopping's progress into `stopping` (a `ResumableEarlyStopping`), if given."""
        if not _load_arrays(self.folder / OPTIMIZER, variables_of(training)):
            raise SettingsError(f"The backup in {str(self.folder)!r} does not fit this training; pass --restart.")
        if stopping is not None:
            stopping.load_state(self.stopping())

    def discard(self) -> None:
        if is_chief():
            shutil.rmtree(self.folder, ignore_errors=True)


def variables_of(kept: Kept) -> list:
    """The variables a backup keeps of `kept`: a model's (or layer's) weights, an optimizer's variables,
    a variable itself, or for a list those of each item in turn (each variable once).

    Example:

    >>> dense = keras.layers.Dense(2)
    >>> dense.build((None, 3))
    >>> [v.path for v in variables_of([dense, dense.kernel])]
    ['dense/kernel', 'dense/bias']
    """
    if isinstance(kept, keras.optimizers.Optimizer):
        return list(kept.variables)
    if isinstance(kept, keras.layers.Layer):
        return list(kept.weights)
    if isinstance(kept, keras.Variable):
        return [kept]
    seen: dict[int, Any] = {}
    for item in kept:
        for variable in variables_of(item):
            seen.setdefault(id(variable), variable)
    return list(seen.values())


def random_state(model: keras.Model) -> list:
    """The states of `model`'s random seed generators (noise, dropout, augmentation): what its next draws will be."""
    weights = {id(w) for w in model.weights}
    return [v for v in model.variables if id(v) not in weights]


def _save_arrays(path: Path, variables) -> None:
    """The variables' values, in order, to one .npz through a flushed temporary file and a rename.

    One file of arrays writes far faster than Keras's .weights.h5 (a dataset per variable).
    """
    _save_values(path, [keras.ops.convert_to_numpy(v) for v in variables])


def _save_values(path: Path, values: list) -> None:
    """Arrays, in order, to one .npz through a flushed temporary file and a rename."""
    tmp = path.with_name(f".tmp.{path.name}")
    with open(tmp, "wb") as f:
        np.savez(f, *values)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _load_arrays(path: Path, variables) -> bool:
    """Assign the saved arrays to `variables` in order; False (nothing assigned) if they do not fit."""
    with np.load(path) as saved:
        values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if len(values) != len(variables) or any(tuple(v.shape) != a.shape for v, a in zip(variables, values)):
        return False
    for variable, value in zip(variables, values):
        variable.assign(value)
    return True


class BackupCallback(keras.callbacks.Callback):
    """Save a `Backup` at every epoch end, and every `every_steps` steps when given.

    The run's last epoch (`final_epoch`) is not backed up: the artifact written
    right after it holds the same weights.

    `history` is the run's history before this `fit`; the epochs of this `fit` are added to it.
    `epoch_values` are entries the history gets at every epoch besides the logs (such as the block).
    `stopping` (a `ResumableEarlyStopping`, placed before this callback): its progress is kept with each
    backup, and a stage it stopped early is backed up as finished when training ends.
    `model` is what the backup keeps as weights (a model or a list, see `variables_of`), `training`
    what it keeps as training state: by default the fitted model's optimizer. With `head` (a stage
    on cached base outputs, where only the head can change) `model`'s weights are written once, when
    training begins, and each backup then writes the head's alone.
    """

    def __init__(self, backup: Backup, model: Kept, stage: int, history: dict[str, list[float]],
                 every_steps: int | None = None, final_epoch: int | None = None, training: Kept = None,
                 head: Kept = None, stopping: Any = None, epoch_values: dict[str, float] | None = None):
        super().__init__()
        self.epoch_values = dict(epoch_values or {})
        self.backup, self.full_model, self.stage, self.every_steps = backup, model, stage, every_steps
        self.final_epoch, self.training, self.head, self.stopping = final_epoch, training, head, stopping
        self.history = {k: list(v) for k, v in history.items()}
        self._epoch, self._steps = 0, 0

    @property
    def async_safe(self) -> bool:
        """Without step backups the batch hook only counts: Keras may run it on a worker thread (on JAX)."""
        return not self.every_steps

    def on_train_begin(self, logs=None):
        if self.head is not None:
            self.backup.save_weights(self.full_model)

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        if not (self.backup.folder / STATE).is_file():  # a run that diverges at once still leaves a state to resume
            self._save(epoch, start=self.stage == 0 and epoch == 0)

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.every_steps and self._steps % self.every_steps == 0:
            # mid-epoch: a resume redoes this epoch, starting from these weights
            self._save(self._epoch)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in {**(logs or {}), **self.epoch_values}.items():
            self.history.setdefault(key, []).append(float(value))
        if epoch + 1 == self.final_epoch:  # the artifact, written next, supersedes this backup
            return
        self._save(epoch + 1)

    def on_train_end(self, logs=None):
        # stopped early (the best weights are back): the stage is done, a resume goes on after its last epoch
        end = self.params.get("epochs")
        if self.stopping is not None and self.stopping.stopped_epoch and end != self.final_epoch:
            self._save(end, stopping=False)

    def _save(self, epoch: int, stopping: bool = True, start: bool = False) -> None:
        if start:  # the first stage's start, which the recipe rebuilds: no weights to write
            self.backup.save(None, None, self.stage, epoch, self.history, start=True)
            return
        model = self.model  # on JAX, reading `model` puts fit's current values back into the variables
        training = model.optimizer if self.training is None else self.training
        progress = self.stopping.state() if stopping and self.stopping is not None else None
        if self.head is None:
            self.backup.save(self.full_model, training, self.stage, epoch, self.history, stopping=progress)
        else:
            self.backup.save(self.head, training, self.stage, epoch, self.history, head_only=True,
                             stopping=progress)
