"""The Recipe: defaults, TOML tables, overrides, validation."""

import pytest

from transferkit.errors import SettingsError
from transferkit.recipe import Recipe, dump_toml


def test_recipe_file_tables_apply_to_their_command():
    pre = Recipe.load("recipes/digits.toml", "pretrain")
    fine = Recipe.load("recipes/digits.toml", "finetune")
    assert pre.task == "denoising" and pre.units == (128, 64, 32)
    assert fine.from_ == "saved_models/digits-encoder" and fine.unfreeze_top == 2
    assert pre.seed == fine.seed == 0


def test_flags_override_the_file_and_none_leaves_it():
    import tomllib

    in_file = tomllib.loads(open("recipes/digits.toml").read())["finetune"]
    fine = Recipe.load("recipes/digits.toml", "finetune").replace(unfreeze_top=1, lr=None)
    assert fine.unfreeze_top == 1 != in_file["unfreeze_top"]
    assert fine.lr == in_file["lr"]


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5])
def test_label_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(SettingsError, match=rf"label_fraction must be a number in \(0, 1\]. Received: label_fraction={fraction}"):
        Recipe().replace(label_fraction=fraction)


def test_unknown_setting_is_refused():
    with pytest.raises(SettingsError, match="Unknown setting 'labelfraction'"):
        Recipe().replace(labelfraction=0.1)


def test_round_trip_through_toml(tmp_path):
    recipe = Recipe().replace(from_="x/enc", units="64,32", label_fraction=0.1)
    path = tmp_path / "r.toml"
    path.write_text(dump_toml(recipe.to_dict()))
    assert Recipe.load(path) == recipe


def test_unknown_table_is_refused(tmp_path):
    path = tmp_path / "r.toml"
    path.write_text("[train]\nepochs = 3\n")
    with pytest.raises(SettingsError, match=r"table \[train\]"):
        Recipe.load(path)


@pytest.mark.parametrize("settings, message", [
    ({"optimizer": "adamax"}, "optimizer must be one of sgd, momentum, nesterov, adam, adamw, nadam, rmsprop. "
                              "Received: optimizer='adamax'"),
    ({"clipnorm": 1.0, "clipvalue": 0.5}, "Only one of clipnorm and clipvalue can be set. "
                                          "Received: clipnorm=1.0, clipvalue=0.5"),
])
def test_an_optimizer_keras_would_refuse_is_refused_by_the_recipe(settings, message):
    # the recipe is the early check: no run builds an optimizer only to see whether it can
    with pytest.raises(SettingsError) as refused:
        Recipe().replace(**settings)
    assert str(refused.value) == message
