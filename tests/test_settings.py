"""One vocabulary: each Recipe field has one flag, one TOML key and its checks in one place."""

import dataclasses

import click
import pytest

from transferkit.cli import cli
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe, dump_toml
from transferkit.settings import describe, flag_name

from helpers import run

TRAINING_COMMANDS = ("pretrain", "finetune", "lr-find", "schedule")
# options of the training commands that are not Recipe settings: the recipe file and each command's own
COMMAND_OPTIONS = {"recipe", "stage_name", "plot", "start_lr", "end_lr", "num_steps", "command", "help"}


def recipe_flags(command: str) -> dict[str, click.Option]:
    return {p.name: p for p in cli.commands[command].params
            if isinstance(p, click.Option) and p.name not in COMMAND_OPTIONS}


def test_every_field_has_exactly_one_flag_and_every_flag_a_field():
    fields = {f.name: f for f in dataclasses.fields(Recipe)}
    flags_per_field: dict[str, set[str]] = {name: set() for name in fields}
    for command in TRAINING_COMMANDS:
        for name, option in recipe_flags(command).items():
            assert name in fields, f"{command} {option.opts} maps to no Recipe field"
            flags_per_field[name].add(option.opts[0])
    for name, flags in flags_per_field.items():
        assert flags == {flag_name(fields[name])}, (name, flags)


def test_every_field_has_one_toml_key_that_round_trips(tmp_path):
    changed = Recipe().replace(from_="enc", seed=3, units=(8, 4), mixup=0.2, test_fraction=0.25, restart=True)
    keys = list(changed.to_dict())
    assert len(keys) == len(set(keys))
    assert "from" in keys and "from_" not in keys
    path = tmp_path / "r.toml"
    path.write_text(dump_toml(changed.to_dict()))
    assert Recipe.load(path) == changed


def test_the_pretraining_flags_are_only_where_they_mean_something():
    assert "task" in recipe_flags("pretrain") and "task" not in recipe_flags("finetune")
    assert "from_" in recipe_flags("finetune") and "from_" not in recipe_flags("pretrain")
    # the pretraining tasks learn without labels: which fraction of them is kept is fine-tuning's setting
    assert "label_fraction" in recipe_flags("finetune") and "label_fraction" not in recipe_flags("pretrain")


@pytest.mark.parametrize("name, bad", [("label_fraction", 0.0), ("label_fraction", 1.5), ("batch_size", 0),
                                       ("lr", -1.0), ("lr", float("inf")), ("schedule", "cosine"),
                                       ("ema", 1.0), ("cutmix", 2.0), ("pseudo_threshold", 0.0)])
def test_a_value_outside_the_settings_range_is_refused_naming_it(name, bad):
    with pytest.raises(SettingsError, match=rf"^{name} must be .*Received: {name}="):
        Recipe().replace(**{name: bad})


def test_every_field_has_help_and_a_shown_default():
    for field in dataclasses.fields(Recipe):
        meta = describe(field)
        assert meta.help.strip(), field.name
        assert field.default is not None or meta.auto, f"{field.name}: --help cannot say what unset means"


def test_a_flag_given_on_the_command_line_reaches_the_recipe(tmp_path):
    out = tmp_path / "curve.png"
    result = run("schedule", "--for", "finetune", "--plot", str(out), "--test-fraction", "0.3",
                 "--from", "missing")
    # --from reaches the recipe: the missing encoder is named (exit 2), after --test-fraction was accepted
    assert result.exit_code == 2 and "missing" in result.output


def test_the_recipes_schedule_choices_are_the_schedules_that_exist():
    from transferkit.pieces.schedules import SCHEDULES
    from transferkit.recipe import SCHEDULES as RECIPE_SCHEDULES

    assert RECIPE_SCHEDULES == SCHEDULES
