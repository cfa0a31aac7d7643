"""What each phase of a fine-tuning run trains on: the labeled examples, the propagated pool, a pseudo-labeled round.

`propagate` spreads the labels over the pool once, on the base as given
(`semi_supervised.propagate_labels` over a kNN graph of the base's outputs, or
of the inputs); `phase_examples` gives a phase its rows and targets, and a
pseudo-labeling round labels the pool with the model as it stands, kept in the
run's backup folder so that a resumed round keeps them.

Example:

>>> examples = phase_examples(plan, plan.phases[0], None, backup)   # doctest: +SKIP
>>> len(examples.rows) == len(plan.split.labeled)                 # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from transferkit.data.pipelines import pipeline
from transferkit.finetuning.feature_cache import compute_features
from transferkit.finetuning.plan import Phase, Plan
from transferkit.finetuning.semi_supervised import propagate_labels, pseudo_labels
from transferkit.store import artifacts
from transferkit.store.backup import Backup
from transferkit.training.distributed import on_this_process
from transferkit.training.runtime import is_chief


@dataclasses.dataclass
class Examples:
    """What a phase trains on: rows of the data and their targets (class indices, or probabilities if `soft`)."""

    rows: np.ndarray
    y: np.ndarray
    soft: bool = False


def phase_examples(plan: Plan, phase: Phase, propagated: np.ndarray | None, backup: Backup) -> Examples:
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


def propagate(plan: Plan) -> tuple[np.ndarray, np.ndarray | None]:
    """LabelSpreading's soft labels for labeled + unlabeled training rows, and the base's outputs it used.

    The raw inputs stand in for the base's outputs (then None) with
    `propagate_on="inputs"` and when the base has no pretrained weights (a
    backbone with `weights="none"`). Features are joined by their angle (a
    cosine kNN graph), inputs by their distance.
    """
    data, split, clf = plan.data, plan.split, plan.clf
    rows = np.concatenate([split.labeled, plan.unlabeled])
    on_inputs = plan.graph_on == "inputs"
    # the base's outputs, or the inputs flattened (N x d float32, filled batch by batch): kNN needs every row at once
    graph = compute_features(clf.features, data.x, plan.batch_size, limit_bytes=math.inf, rows=rows, flat=on_inputs)
    labels = np.concatenate([data.y[split.labeled], np.full(len(plan.unlabeled), -1)]).astype(np.int64)
    on, graph = (graph, None) if on_inputs else (graph.astype(np.float64), graph)
    # a network's features by their angle (the scale of a code says little); inputs by distance, as scikit-learn
    return propagate_labels(on, labels, data.num_classes, cosine=graph is not None), graph
