"""Where a classifier fails: per-class figures, the confusion matrix, its worst pairs and examples.

Every figure comes from scikit-learn's metrics on the predicted probabilities;
this module only arranges them as data (JSON-ready), as text, and as pictures.

Example:

>>> import numpy as np
>>> from transferkit.commands.report import class_report, format_report
>>> p = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
>>> report = class_report(p, np.array([0, 1, 2]), ["cat", "dog", "owl"])
>>> report["confusion_matrix"], report["most_confused"]
([[1, 0, 0], [0, 1, 0], [1, 0, 0]], [{'true': 'owl', 'predicted': 'cat', 'count': 1}])
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from transferkit.errors import SettingsError
from transferkit.pieces.uncertainty import EPSILON

AUTO_TOP_K = 5
MOST_CONFUSED = 5
MATRIX_MAX_CLASSES = 30  # the text matrix of more classes would not fit a terminal: see --output or --plots


def resolve_top_k(top_k: int | None, num_classes: int) -> int | None:
    """The top-k to report: `top_k` checked, or by default 5 when there are more than 5 classes (else none).

    Args:
        top_k: Optional integer. Defaults to `None` (automatic).
        num_classes: Integer. The model's classes.

    Returns:
        An integer in `[1, num_classes)`, or `None` for no top-k accuracy.

    Raises:
        SettingsError: `top_k` is below 1 or not below `num_classes` (top-`num_classes` is always 1).
    """
    if top_k is None:
        return AUTO_TOP_K if num_classes > AUTO_TOP_K else None
    if not 1 <= top_k < num_classes:
        raise SettingsError(f"--top-k must be between 1 and {num_classes - 1} (the model has {num_classes} "
                            f"classes). Received: top_k={top_k}")
    return int(top_k)


def class_report(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                 top_k: int | None = None) -> dict[str, Any]:
    """Per-class precision, recall, F1 and support, their averages, balanced and top-k accuracy, the confusion matrix.

    Args:
        probabilities: `(n, classes)` array of predicted probabilities.
        labels: `(n,)` integer true classes.
        class_names: One name per class (column of `probabilities`).
        top_k: Optional integer. Also the top-k accuracy. Defaults to `None`.

    Returns:
        A JSON-ready dict: `per_class` (a list of dicts `class`, `precision`,
        `recall`, `f1`, `support`), `macro_avg`, `weighted_avg`,
        `balanced_accuracy`, `top_k_accuracy` (`None` without `top_k`),
        `confusion_matrix` (rows: true class, columns: predicted) and
        `most_confused` (up to 5 dicts `true`, `predicted`, `count`).
    """
    from sklearn import metrics

    classes = np.arange(probabilities.shape[1])
    predicted = probabilities.argmax(axis=1)
    table = metrics.classification_report(labels, predicted, labels=classes, target_names=list(class_names),
                                          output_dict=True, zero_division=0)
    matrix = metrics.confusion_matrix(labels, predicted, labels=classes)
    with warnings.catch_warnings():  # a class predicted but absent from the labels: sklearn warns, the score holds
        warnings.simplefilter("ignore")
        balanced = metrics.balanced_accuracy_score(labels, predicted)
    top = None
    if top_k:
        scores = probabilities[:, 1] if len(classes) == 2 else probabilities  # sklearn's binary form
        top = float(metrics.top_k_accuracy_score(labels, scores, k=top_k, labels=classes))
    return {
        "per_class": [{"class": name, **_scores(table[name])} for name in class_names],
        "macro_avg": _scores(table["macro avg"]),
        "weighted_avg": _scores(table["weighted avg"]),
        "balanced_accuracy": float(balanced),
        "top_k_accuracy": top,
        "confusion_matrix": matrix.tolist(),
        "most_confused": most_confused(matrix, class_names),
    }


def most_confused(matrix: np.ndarray, class_names: Sequence[str], count: int = MOST_CONFUSED) -> list[dict[str, Any]]:
    """The `count` largest off-diagonal cells of a confusion matrix, largest first (ties in row, column order)."""
    matrix = np.asarray(matrix)
    cells = [(-int(matrix[t, p]), t, p) for t in range(len(matrix)) for p in range(len(matrix)) if t != p
             and matrix[t, p] > 0]
    return [{"true": class_names[t], "predicted": class_names[p], "count": -n} for n, t, p in sorted(cells)[:count]]


def format_report(report: dict[str, Any]) -> str:
    """The per-class table, averages, confusion matrix and most-confused pairs of a `class_report`, as text.

    Args:
        report: Dict. What `class_report` returns.

    Returns:
        Lines of text (the single-number figures are left to the caller's table).
    """
    width = max(12, *(len(row["class"]) for row in report["per_class"]))
    lines = [f"{'class':<{width}}  precision  recall      f1  support"]
    rows = [(row["class"], row) for row in report["per_class"]]
    rows += [("macro avg", report["macro_avg"]), ("weighted avg", report["weighted_avg"])]
    for name, row in rows:
        lines.append(f"{name:<{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:6.4f}  "
                     f"{row['support']:7d}")
    names = [row["class"] for row in report["per_class"]]
    if len(names) <= MATRIX_MAX_CLASSES:
        lines.append("confusion matrix (rows: true class, columns: predicted)")
        lines.append(_matrix_text(report["confusion_matrix"], names))
    else:
        lines.append(f"confusion matrix: {len(names)} classes, too many to print (see --output or --plots)")
    pairs = [f"{p['true']} -> {p['predicted']} ({p['count']})" for p in report["most_confused"]]
    lines.append("most confused (true -> predicted): " + (", ".join(pairs) or "none, every example is right"))
    return "\n".join(lines)


def confusion_figure(matrix: Sequence[Sequence[int]], class_names: Sequence[str], title: str | None = None) -> Figure:
    """The confusion matrix as a heat map with the class names (and the counts, for up to 20 classes).

    Args:
        matrix: Square counts, rows true classes and columns predicted ones.
        class_names: One name per class.
        title: Optional title. Defaults to `None`.

    Returns:
        A `matplotlib.figure.Figure` (Agg canvas).
    """
    matrix = np.asarray(matrix)
    n = len(matrix)
    side = min(12.0, 2.5 + 0.45 * n)
    fig = Figure(figsize=(side + 1, side))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    image = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90 if n > 10 else 0, fontsize=8)
    ax.set_yticks(range(n), [str(c) for c in class_names], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if n <= 20:
        middle = matrix.max() / 2
        for t in range(n):
            for p in range(n):
                ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=7,
                        color="white" if matrix[t, p] > middle else "black")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def top_losses(probabilities: np.ndarray, labels: np.ndarray, count: int = 16) -> np.ndarray:
    """Indices of the `count` examples with the highest loss (negative log-probability of the true class)."""
    loss = -np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, None))
    return np.argsort(-loss, kind="stable")[:count]


def top_losses_figure(x: np.ndarray, labels: np.ndarray, probabilities: np.ndarray, class_names: Sequence[str],
                      value_range: tuple[float, float] | None = None, count: int = 16, per_row: int = 4) -> Figure:
    """The `count` examples with the highest loss, four per row, each titled `true -> predicted probability`.

    Args:
        x: Inputs (images or vectors `pictures.as_images` shows).
        labels: `(n,)` integer true classes.
        probabilities: `(n, classes)` predicted probabilities.
        class_names: One name per class.
        value_range: Optional `(low, high)` of the inputs' color scale. Defaults to their own range.
        count: Integer. How many examples. Defaults to `16`.
        per_row: Integer. Examples per row. Defaults to `4`.

    Returns:
        A `matplotlib.figure.Figure` (Agg canvas).
    """
    from transferkit.store.pictures import image_grid

    worst = top_losses(probabilities, labels, count)
    predicted = probabilities[worst].argmax(axis=1)
    titles = [f"{_short(class_names[t])} -> {_short(class_names[p])} {probabilities[i, p]:.2f}"
              for i, t, p in zip(worst, labels[worst], predicted)]
    starts = range(0, len(worst), per_row)
    rows = [(f"{s + 1}-{min(s + per_row, len(worst))}", x[worst[s:s + per_row]]) for s in starts]
    return image_grid(rows, value_range=value_range, titles=[titles[s:s + per_row] for s in starts],
                      title="highest loss: true -> predicted (probability)")


def _scores(row: dict[str, float]) -> dict[str, Any]:
    return {"precision": float(row["precision"]), "recall": float(row["recall"]), "f1": float(row["f1-score"]),
            "support": int(row["support"])}


def _matrix_text(matrix: Sequence[Sequence[int]], names: Sequence[str]) -> str:
    shown = [_short(n, 6) for n in names]
    width = max(3, *(len(str(v)) for row in matrix for v in row), *(len(n) for n in shown))
    label = max(len(n) for n in shown)
    lines = [" " * label + " " + " ".join(n.rjust(width) for n in shown)]
    for name, row in zip(shown, matrix):
        lines.append(name.rjust(label) + " " + " ".join(str(v).rjust(width) for v in row))
    return "\n".join(lines)


def _short(name: str, length: int = 10) -> str:
    return name if len(name) <= length else name[:length - 1] + "~"
