"""Training curves as a table: `history.csv`, one row per epoch, beside `history.json`.

Keras's history holds one list per logged value (loss, metrics, the learning
rate where a callback logs it). The table adds the epoch number and, for a
classifier, the stage the epoch belongs to, taken from the manifest's `stages`
(their epochs in order; a head stage that stopped early has `stopped_after`).

Example:

>>> stages = [{"name": "head", "phase": "labeled", "epochs": 1}, {"name": "top1", "phase": "labeled", "epochs": 2}]
>>> for row in history_rows({"loss": [0.9, 0.5, 0.4]}, stages):
...     print(row)
{'epoch': 1, 'stage': 'head', 'loss': 0.9}
{'epoch': 2, 'stage': 'top1', 'loss': 0.5}
{'epoch': 3, 'stage': 'top1', 'loss': 0.4}
"""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LAST = "learning_rate"


def epoch_stages(stages: Sequence[dict[str, Any]] | None, epochs: int) -> tuple[list[int], list[str]]:
    """The epoch number (as Keras counts it, from 1) and stage name of each of `epochs` history rows.

    A stage runs epochs `start + 1`..`start + epochs` (its start is the planned
    epochs of the stages before it); one that stopped early ran up to its
    `stopped_after`. A stage of a phase other than `labeled` is named
    `name (phase)`, as training prints it. When the stages do not account for
    exactly `epochs` rows (none known, or a resumed run that lost a stop),
    the epochs are numbered 1..`epochs` and the stages left blank.

    Args:
        stages: Optional manifest `stages` (dicts with `name`, `epochs`, optional `phase`, `stopped_after`).
        epochs: Integer. Rows in the history.

    Returns:
        Two lists of length `epochs`: epoch numbers and stage names.
    """
    numbers: list[int] = []
    names: list[str] = []
    start = 0
    for stage in stages or ():
        end = min(start + int(stage["epochs"]), int(stage.get("stopped_after") or start + int(stage["epochs"])))
        phase = stage.get("phase", "labeled")
        name = stage["name"] if phase in (None, "labeled") else f"{stage['name']} ({phase})"
        numbers += range(start + 1, end + 1)
        names += [name] * (end - start)
        start += int(stage["epochs"])
    if len(numbers) != epochs:
        return list(range(1, epochs + 1)), [""] * epochs
    return numbers, names


def history_rows(history: dict[str, list[float]], stages: Sequence[dict[str, Any]] | None = None
                 ) -> list[dict[str, Any]]:
    """One dict per epoch: `epoch`, `stage`, then `loss`, the other values by name, the learning rate last.

    Values whose list is shorter than the loss's (not logged every epoch) are
    left out, as they could not be placed on their epochs; `history.json` keeps them.

    Args:
        history: Dict of lists, as Keras's `History.history` or `history.json`.
        stages: Optional manifest `stages`. Defaults to `None` (stage left blank).

    Returns:
        A list of dicts, one per epoch.
    """
    epochs = max((len(v) for v in history.values()), default=0)
    keys = sorted((k for k, v in history.items() if len(v) == epochs),
                  key=lambda k: (k != "loss", k == LAST, k))
    numbers, names = epoch_stages(stages, epochs)
    return [{"epoch": numbers[i], "stage": names[i], **{k: history[k][i] for k in keys}} for i in range(epochs)]


def write_history_csv(path: str | os.PathLike, history: dict[str, list[float]],
                      stages: Sequence[dict[str, Any]] | None = None) -> Path:
    """Write `history_rows` as CSV with a header, through a temporary sibling file and a rename.

    Args:
        path: The CSV file to write.
        history: Dict of lists, as Keras's `History.history`.
        stages: Optional manifest `stages`. Defaults to `None`.

    Returns:
        The path written.
    """
    path = Path(path)
    rows = history_rows(history, stages)
    header = list(rows[0]) if rows else ["epoch", "stage", *sorted(history)]
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)
    return path
