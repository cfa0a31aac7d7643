"""Semi-supervised fine-tuning: learn from the unlabeled training pool while fine-tuning.

The unlabeled pool is the training part of the split minus its labeled
examples; validation and test examples never enter it. Two ways to use it:

- `pseudo` (self-training): after the usual stages on the labeled examples,
  each of `rounds` rounds labels the pool with the network's own predictions,
  keeps the `k` most confident per class (class-balanced; `k` grows each
  round, to the pool's size over the number of classes in the last; with
  `threshold` only predictions at least that confident), and trains the last stage again
  on labeled + pseudo-labeled examples.
- `propagate`: scikit-learn's `LabelSpreading(kernel="knn")` spreads the labels
  over a k-nearest-neighbour graph of the base's features (the raw inputs for
  a backbone without pretrained weights); the network trains, stage by stage,
  on the propagated soft labels of the whole pool, then its last stage on the
  true labels.

A stage on the pool takes as many optimizer steps as the same stage on the
labeled examples alone: its epochs are scaled down by the pool's size.

Example:

>>> import numpy as np
>>> from transferkit.finetuning.semi_supervised import pseudo_labels
>>> probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8], [0.45, 0.55]])
>>> pseudo_labels(probs, round_=1, rounds=2, threshold=None)   # k = 1 per class in round 1 of 2
(array([0, 2]), array([0, 1]))
"""

from __future__ import annotations

import math

import numpy as np


NEIGHBOURS = 7  # LabelSpreading's kNN graph, as in the measurements
SPREAD = 0.9  # LabelSpreading's alpha


def unlabeled_pool(train: np.ndarray, labeled: np.ndarray, test: np.ndarray) -> np.ndarray:
    """The training examples whose labels are not used; refuses a pool that would hold a test example."""
    pool = np.setdiff1d(train, labeled)
    if len(np.intersect1d(pool, test)):
        raise RuntimeError("the unlabeled pool overlaps the test split; this is a bug in the split")
    return pool


def per_class(pool: int, round_: int, rounds: int, classes: int) -> int:
    """How many pool rows round `round_` of `rounds` pseudo-labels per class, at most: `ceil(round_ * pool / (rounds * classes))`."""
    return math.ceil(round_ * pool / (rounds * classes))


def pseudo_labels(probs: np.ndarray, round_: int, rounds: int,
                  threshold: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Rows of `probs` to pseudo-label in round `round_` (1-based) of `rounds`, and their labels.

    Class-balanced top-k: for each class, the `k = ceil(round_ * n / (rounds * classes))`
    rows predicted as that class with the highest probability (and, with
    `threshold`, only those at least that probable). Ties go to the lower row.
    """
    n, classes = probs.shape
    k = per_class(n, round_, rounds, classes)
    predicted, confidence = probs.argmax(axis=1), probs.max(axis=1)
    chosen = []
    for c in range(classes):
        rows = np.flatnonzero(predicted == c)
        if threshold is not None:
            rows = rows[confidence[rows] >= threshold]
        order = np.argsort(-confidence[rows], kind="stable")
        chosen.append(rows[order[:k]])
    rows = np.sort(np.concatenate(chosen)).astype(np.int64)
    return rows, predicted[rows]


def propagate_labels(features: np.ndarray, labels: np.ndarray, num_classes: int,
                     n_neighbors: int = NEIGHBOURS, alpha: float = SPREAD, cosine: bool = False) -> np.ndarray:
    """Soft labels for every row of `features`: LabelSpreading over a kNN graph; `labels` is -1 where unknown.

    Rows with a known label keep it (one-hot); the others get LabelSpreading's
    label distributions (all zeros, so no loss, for a row the graph does not
    reach). Float32 `features` are used as they are: scikit-learn's kNN computes
    the distances of float32 rows in float64 all the same. `alpha` is the share of each step's labels taken from the
    neighbours: 0.9 rather than scikit-learn's 0.2, which with one label per
    class leaves most of two moons unreached (and is no better on digits).
    `cosine`: neighbours by the angle between rows (each row scaled to unit
    L2 norm first, scikit-learn's `normalize`), as Iscen et al. (2019, "Label
    Propagation for Deep Semi-supervised Learning") build the graph of a
    network's features; else by Euclidean distance.
    """
    from sklearn.preprocessing import normalize
    from sklearn.semi_supervised import LabelSpreading

    flat = features.reshape(len(features), -1)
    flat = flat if flat.dtype == np.float32 else flat.astype(np.float64)  # float32: no float64 copy of N x d
    if cosine:
        flat = normalize(flat)
    spreading = LabelSpreading(kernel="knn", n_neighbors=min(n_neighbors, len(flat) - 1), alpha=alpha,
                               max_iter=1000)
    spreading.fit(flat, labels)
    soft = np.zeros((len(flat), num_classes), dtype=np.float32)
    soft[:, spreading.classes_] = spreading.label_distributions_
    known = labels >= 0
    soft[known] = np.eye(num_classes, dtype=np.float32)[labels[known]]
    return soft


def pool_epochs(epochs: int, labeled_steps: int, pool_steps: int) -> int:
    """Epochs of `pool_steps` steps that add up to about `epochs` epochs of `labeled_steps` steps (at least 1)."""
    return max(1, round(epochs * labeled_steps / pool_steps))
