"""Backups that let a killed fine-tuning run continue where it stopped.

At every epoch end (and every `backup_every` steps) the run's state goes to a
hidden sibling of its output folder, `.NAME.backup/`: the whole classifier's
weights, the optimizer's variables, the stage, the next epoch and the history
so far. Each file is written to a temporary name and renamed into place, the
state last, so a kill at any moment leaves the previous backup whole. Running
the same command again continues from it; a backup made with other settings is
refused (or discarded with `restart`).

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

from transferkit import artifacts
from transferkit.errors import SettingsError

STATE = "state.json"
WEIGHTS = "model.weights.h5"
OPTIMIZER = "optimizer.npz"


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
        """The saved state, `None` when there is none; refuses one made with other settings."""
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

    def save(self, model: keras.Model, optimizer, stage: int, epoch: int, history: dict[str, list[float]]) -> None:
        """Write weights, optimizer variables, then the state that points at them, each atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".tmp.{WEIGHTS}"
        model.save_weights(tmp)
        _fsync_replace(tmp, self.folder / WEIGHTS)
        tmp = self.folder / f".tmp.{OPTIMIZER}"
        with open(tmp, "wb") as f:
            np.savez(f, *[keras.ops.convert_to_numpy(v) for v in optimizer.variables])
        _fsync_replace(tmp, self.folder / OPTIMIZER)
        artifacts.write_json(self.folder / STATE, {"settings": self.settings, "stage": stage, "epoch": epoch,
                                                   "history": history})

    def load_weights(self, model: keras.Model) -> None:
        model.load_weights(self.folder / WEIGHTS)

    def restore(self, model: keras.Model, trained: keras.Model) -> None:
        """Load the weights into `model` and the optimizer variables into `trained`'s (compiled) optimizer."""
        self.load_weights(model)
        optimizer = trained.optimizer
        if not optimizer.built:
            optimizer.build(trained.trainable_variables)
        with np.load(self.folder / OPTIMIZER) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        if len(values) == len(optimizer.variables):
            for variable, value in zip(optimizer.variables, values):
                variable.assign(value)

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _fsync_replace(tmp: Path, target: Path) -> None:
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, target)


class BackupCallback(keras.callbacks.Callback):
    """Save a `Backup` at every epoch end, and every `every_steps` steps when given.

    The run's last epoch (`final_epoch`) is not backed up: the artifact written
    right after it holds the same weights.

    `history` is the run's history before this `fit`; the epochs of this `fit` are added to it.
    """

    def __init__(self, backup: Backup, model: keras.Model, stage: int, history: dict[str, list[float]],
                 every_steps: int | None = None, final_epoch: int | None = None):
        super().__init__()
        self.backup, self.full_model, self.stage, self.every_steps = backup, model, stage, every_steps
        self.final_epoch = final_epoch
        self.history = {k: list(v) for k, v in history.items()}
        self._epoch, self._steps = 0, 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        self._steps += 1
        if self.every_steps and self._steps % self.every_steps == 0:
            # mid-epoch: a resume redoes this epoch, starting from these weights
            self.backup.save(self.full_model, self.model.optimizer, self.stage, self._epoch, self.history)

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        if epoch + 1 == self.final_epoch:  # the artifact, written next, supersedes this backup
            return
        self.backup.save(self.full_model, self.model.optimizer, self.stage, epoch + 1, self.history)
