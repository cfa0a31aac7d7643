"""The `--class-weight` setting: per-class loss weights for `fit(class_weight=...)`. No Keras here.

`balanced` weighs class `c` by `n / (K * n_c)` (`n` labeled examples, `K`
classes, `n_c` of them in class `c`), as scikit-learn's
`compute_class_weight("balanced")`: every class then carries the same total
weight. A JSON file maps class names (or numbers, for data without names) to
weights; classes it leaves out keep weight 1.

Example:

>>> import numpy as np
>>> resolve_class_weight("balanced", np.array([0, 0, 0, 1]), ("a", "b"))
{0: 0.6666666666666666, 1: 2.0}
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import SettingsError

MODES = ("none", "balanced")


def check_class_weight_setting(value: str) -> None:
    """Refuse a setting that is neither a mode nor an existing `.json` file."""
    if value in MODES:
        return
    if not str(value).endswith(".json"):
        raise SettingsError(f"class_weight must be balanced, none or a JSON file of per-class weights. "
                            f"Received: class_weight={value!r}")
    if not Path(value).is_file():
        raise SettingsError(f"class_weight file {value!r} does not exist; expected a JSON file such as "
                            f'{{"cat": 2.0, "dog": 1.0}}.')


def resolve_class_weight(setting: str, labels: np.ndarray, class_names: Sequence[str]) -> dict[int, float] | None:
    """The weight of each class index for `fit`, or None for `none`.

    Args:
        setting: String. `"none"`, `"balanced"` or the path of a JSON file.
        labels: Integer array. The labeled training examples' classes (for `balanced`).
        class_names: The classes' names, in index order (the numbers as text when the data has none).

    Returns:
        `{class index: weight}` for every class, or None.

    Raises:
        SettingsError: a file that is not a JSON object of positive numbers, or that names a class the data lacks.
    """
    if setting == "none":
        return None
    classes = len(class_names)
    if setting == "balanced":
        counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=classes)
        if counts.min() == 0:
            missing = class_names[int(np.argmin(counts))]
            raise SettingsError(f"class_weight balanced needs a labeled example of every class; class {missing!r} "
                                "has none.")
        return {c: float(len(labels) / (classes * counts[c])) for c in range(classes)}
    check_class_weight_setting(setting)
    try:
        given = json.loads(Path(setting).read_text())
    except (OSError, ValueError) as err:
        raise SettingsError(f"class_weight file {setting!r} is not valid JSON: {err}.") from None
    if not isinstance(given, dict):
        raise SettingsError(f"class_weight file {setting!r} must hold a JSON object of class name -> weight. "
                            f"Received: {type(given).__name__}")
    index = {str(name): i for i, name in enumerate(class_names)}
    weights = {c: 1.0 for c in range(classes)}
    for name, weight in given.items():
        if str(name) not in index:
            raise SettingsError(f"class_weight file {setting!r} names class {name!r}, which the data does not have; "
                                f"expected one of {', '.join(index)}.")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < math.inf:
            raise SettingsError(f"class_weight file {setting!r} gives class {name!r} weight {weight!r}; expected a "
                                "positive number.")
        weights[index[str(name)]] = float(weight)
    return weights


def class_names(data: Any) -> list[str]:
    """The classes' names in index order: the data's, else the class numbers as text."""
    return [str(n) for n in data.class_names] if data.class_names else [str(i) for i in range(data.num_classes)]


def class_weight_record(setting: str, weights: dict[int, float] | None, names: Sequence[str]) -> dict[str, Any]:
    """What the manifest says of the class weights: the setting, and each class's weight by name."""
    return {"setting": setting,
            "weights": None if weights is None else {names[c]: w for c, w in sorted(weights.items())}}
