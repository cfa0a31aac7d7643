"""What each Recipe setting is: its help, choices, check and the commands whose flags carry it.

Every field of `transferkit.Recipe` is declared with `setting(...)`, which
stores this metadata on the dataclass field. The Recipe validates each value
from it, and the CLI generates one Click option per field from it (help with
the default, choices, bool flags), so a setting's default, choices, check and
help live once. This module imports neither Click nor TensorFlow.

Example:

>>> import dataclasses
>>> from transferkit.recipe import Recipe
>>> meta = describe(next(f for f in dataclasses.fields(Recipe) if f.name == "label_fraction"))
>>> meta.expected, meta.commands
('a number in (0, 1]', ('pretrain', 'finetune', 'lr-find', 'schedule'))
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from transferkit.errors import SettingsError

# which commands' flags carry a setting
RUN = ("pretrain", "finetune", "lr-find", "schedule")  # every training command
PRETRAIN = ("pretrain", "schedule")  # the pretraining task and its encoder
BASE = ("finetune", "lr-find", "schedule")  # the base, its head and its stages
FINETUNE = ("finetune", "lr-find", "schedule")  # what fine-tuning adds on top (semi-supervised, augmentation, ...)


@dataclasses.dataclass(frozen=True)
class Setting:
    """The metadata of one Recipe field.

    Args:
        help: String. The flag's help text.
        commands: Tuple of strings. The CLI commands whose flags carry it.
        choices: Tuple of strings, or `None`. The allowed values.
        check: Callable `value -> bool`, or `None`. Applied to a value that is not `None`.
        expected: String. What `check` accepts, for the error ("a number in (0, 1]").
        auto: String, dict, or `None`. What an unset (`None`) value becomes, for `--help`; a dict gives it per
            command (its `""` entry for any command it does not name).
        flag: String, or `None`. The flag, if not `--` + the field name with `-` for `_`.
        off: String, or `None`. A bool flag's negative form (default `--no-NAME`).
        kind: String. `"text"`, `"path"` (a file), `"folder"` or `"list"` (comma-separated integers):
            how the CLI reads the value, where the field's type does not say it.
    """

    help: str
    commands: tuple[str, ...] = RUN
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], bool] | None = None
    expected: str = ""
    auto: str | dict[str, str] | None = None
    flag: str | None = None
    off: str | None = None
    kind: str = "text"

    def auto_for(self, command: str) -> str | None:
        """What an unset value becomes for `command`, as `--help` says it."""
        return self.auto.get(command, self.auto[""]) if isinstance(self.auto, dict) else self.auto

    def error(self, name: str, value: Any) -> str | None:
        """The message for `value` of field `name` if it is not allowed, else `None`."""
        if value is None:
            return None
        if self.choices is not None and value not in self.choices:
            return f"{name} must be one of {', '.join(self.choices)}. Received: {name}={value!r}"
        if self.check is not None and not self.check(value):
            return f"{name} must be {self.expected}. Received: {name}={value!r}"
        return None


def setting(default: Any, help: str, **meta: Any) -> Any:
    """A Recipe field with `default` and its `Setting` metadata (see `Setting` for the keywords)."""
    return dataclasses.field(default=default, metadata={"setting": Setting(help, **meta)})


def describe(field: dataclasses.Field) -> Setting:
    """The `Setting` of a Recipe field."""
    return field.metadata["setting"]


def flag_name(field: dataclasses.Field) -> str:
    """The CLI flag of a Recipe field: `--label-fraction` for `label_fraction`, `--from` for `from_`."""
    return describe(field).flag or "--" + field.name.rstrip("_").replace("_", "-")


def in_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[Any], bool]:
    """A check that a number lies between `low` and `high` (each end closed unless `*_open`)."""

    def check(value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        return above and below

    return check


def at_least(low: float, *, strictly: bool = False) -> Callable[[Any], bool]:
    """A check that a number is at least `low` (above it if `strictly`), and finite."""
    return in_range(low, float("inf"), low_open=strictly, high_open=True)


def coerce_value(key: str, value: Any, label: str | None = None) -> Any:
    """`value` of the Recipe field `key` in the field's type: `"128,64"` or a TOML list becomes `(128, 64)`, a
    layer index a string, `false` for batchnorm "none", a learning rate given as text a float; `label` names the value
    in the errors (default `key`)."""
    label = label or key
    if key in ("units", "filters"):
        given = value
        if isinstance(value, str):
            value = [v for v in value.replace(" ", "").split(",") if v]
        try:
            return tuple(int(v) for v in value)
        except (TypeError, ValueError):
            raise SettingsError(f"{label} must be integers such as 128,64; Received: {label}={given!r}") from None
    if key == "cut" and isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if key == "batchnorm" and value in (False, None):
        return "none"
    if key == "lr" and isinstance(value, str) and value != "auto":
        try:
            return float(value)
        except ValueError:
            raise SettingsError(f"{label} must be a positive number or auto. Received: {label}={value!r}") from None
    return value
