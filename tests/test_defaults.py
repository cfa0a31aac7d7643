"""Defaults that train well, stages that keep their best epoch, and runs that stop when training diverges."""

import json
import math
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import transferkit as tk
from transferkit.cli import cli
from transferkit.data.sources import load_data
from transferkit.training.defaults import (FINETUNE_STEPS, HEAD_STEPS, MIN_EPOCHS, PRETRAIN_MAX_EPOCHS,
                                          PRETRAIN_STEPS, describe_chosen)
from transferkit.recipe import Recipe

from helpers import run


def validation_loss(artifact: Path, loss) -> float:
    """The saved model's loss on its validation rows, computed here: cross-entropy, or MSE to `loss(model, x)`."""
    manifest = json.loads((artifact / "manifest.json").read_text())
    split = json.loads((artifact / "split.json").read_text())
    data = load_data(manifest["data"]["spec"])
    model = keras.saving.load_model(artifact / "model.keras")
    x = data.x[np.asarray(split["val"])]
    if loss is None:  # cross-entropy from the head's logits in float64: no probability clipped at Keras's epsilon
        head = model.get_layer("head")
        features = keras.Model(model.inputs, head.input).predict(x, batch_size=len(x), verbose=0)
        kernel, bias = (keras.ops.convert_to_numpy(w).astype("float64") for w in head.weights)
        logits = features.astype("float64") @ kernel + bias
        true = logits[np.arange(len(x)), data.y[np.asarray(split["val"])]]
        return float(np.mean(np.logaddexp.reduce(logits, axis=1) - true))
    predicted = model.predict(x, batch_size=len(x), verbose=0)
    return float(np.mean((predicted - loss(model, x)) ** 2))


def test_an_unfreezing_stage_that_overfits_keeps_its_best_epoch(encoder_dir, tmp_path):
    # 1 label per class and a high constant rate for every block: the validation loss falls, then rises
    out = tmp_path / "clf"
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.01, head_epochs=0, epochs=40, unfreeze_top=3,
                         lr=0.03, finetune_lr_factor=1.0, schedule="constant", patience=8, out=str(out), verbose=False)
    val = np.asarray(result.history["val_loss"])
    best = int(np.argmin(val))
    assert best < len(val) - 1, "the stage did not overfit: the test proves nothing"
    assert len(val) == best + 1 + 8  # stopped after 8 epochs without improvement
    assert validation_loss(out, None) == pytest.approx(val[best], rel=1e-4)
    assert validation_loss(out, None) < val[-1]
    stage = json.loads((out / "manifest.json").read_text())["stages"][0]
    assert stage["best_epoch"] == best + 1 and stage["stopped_after"] == len(val)


def test_a_onecycle_stage_is_judged_from_its_middle(encoder_dir, tmp_path):
    # the overfitting stage above, under 1cycle: the epochs before the middle neither stop it nor give its weights
    epochs, patience = 40, 3
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.01, head_epochs=0, epochs=epochs, unfreeze_top=3,
                         lr=0.03, finetune_lr_factor=1.0, schedule="onecycle", patience=patience,
                         out=str(tmp_path / "clf"), verbose=False)
    val = np.asarray(result.history["val_loss"])
    judged = epochs // 2  # ONECYCLE_JUDGED_FROM = 0.5 of the stage's epochs, counted from its start
    best = judged + int(np.argmin(val[judged:]))
    assert int(np.argmin(val)) < judged, "the best loss came after the middle: the test proves nothing"
    stage = result.manifest["stages"][0]
    assert stage["best_epoch"] == best + 1
    assert len(val) == min(epochs, best + 1 + patience) and len(val) > judged
    assert validation_loss(tmp_path / "clf", None) == pytest.approx(val[best], rel=1e-4)


@pytest.mark.parametrize("schedule, retrains, judged", [
    ("onecycle", False, 150),  # the middle of epochs 100..200
    ("onecycle", True, 100),  # a stage that trains again what the run trained: from its start
    ("constant", False, 100),
])
def test_where_early_stopping_starts_judging(schedule, retrains, judged):
    from transferkit.training.runner import Stage, judged_from

    stage = Stage("top3", model=None, train=None, start=100, end=200, batches_per_epoch=1, retrains=retrains)
    assert judged_from(stage, Recipe(schedule=schedule)) == judged


def test_pretraining_that_overfits_keeps_its_best_epoch(tmp_path):
    # a few inputs of noise: the autoencoder learns them by heart and its validation loss rises
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "noise.npz", x=rng.normal(size=(60, 32)).astype("float32"))
    common = dict(data=f"npz:{tmp_path / 'noise.npz'}", task="autoencoder", units=(16,), lr=0.02,
                  schedule="constant", batch_size=8, verbose=False)
    stopped = tk.pretrain(epochs=200, patience=5, out=str(tmp_path / "stopped"), **common)
    val = np.asarray(stopped.history["val_loss"])
    best = int(np.argmin(val))
    assert best < len(val) - 1, "pretraining did not overfit: the test proves nothing"
    assert len(val) == best + 1 + 5
    assert stopped.metrics["val_loss"] == pytest.approx(val[best])
    # the same run stopped by hand at the best epoch (a constant rate: its first epochs are the same)
    by_hand = tk.pretrain(epochs=best + 1, patience=0, out=str(tmp_path / "by-hand"), **common)
    assert by_hand.history["val_loss"][-1] == pytest.approx(val[best], rel=1e-5)
    for kept, expected in zip(stopped.model.weights, by_hand.model.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(kept), keras.ops.convert_to_numpy(expected),
                                   rtol=1e-5, atol=1e-6, err_msg=kept.path)


@pytest.mark.parametrize("lr, best", [(0.1, 3), (1.5, 0)], ids=["improving", "overshooting"])
def test_early_stopping_ends_on_the_best_epochs_weights_and_puts_back_none_when_it_is_the_last(lr, best,
                                                                                             monkeypatch):
    from transferkit.pieces.callbacks import ResumableEarlyStopping

    # w <- w (1 - 2 lr) on mse(w * 1, 0): the loss falls every epoch at lr 0.1, and grows at 1.5
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(1, use_bias=False, kernel_initializer="ones")])
    model.compile(keras.optimizers.SGD(lr), "mse")
    seen = []
    record = keras.callbacks.LambdaCallback(
        on_epoch_end=lambda epoch, logs: seen.append((logs["loss"], np.array(model.get_weights()[0]))))
    put_back = []
    set_weights = keras.Model.set_weights
    monkeypatch.setattr(keras.Model, "set_weights", lambda self, w: put_back.append(1) or set_weights(self, w))
    model.fit(np.ones((4, 1)), np.zeros((4, 1)), batch_size=4, epochs=4, verbose=0,
              callbacks=[record, ResumableEarlyStopping(monitor="loss", patience=10)])
    losses = [loss for loss, _ in seen]
    assert int(np.argmin(losses)) == best
    np.testing.assert_array_equal(model.get_weights()[0], seen[best][1])
    assert len(put_back) == (best != len(seen) - 1)


@pytest.mark.parametrize("floor, epoch_loss, diverged", [
    (0.0, 4.3, True),  # ten times a first loss of 0.28 is 2.8
    (math.log(10), 4.3, False),  # a loss a uniform guess over 10 classes passes (2.30) is not ten times it
    (math.log(10), 30.0, True),  # over ten times a uniform guess's loss: diverged, and the message says so
])
def test_the_divergence_bound_is_at_least_ten_times_a_uniform_guess(floor, epoch_loss, diverged):
    from transferkit.errors import TransferkitError
    from transferkit.pieces.callbacks import StopOnDivergence

    stop = StopOnDivergence("top3", learning_rate=0.001, floor=floor)
    stop.set_model(keras.Sequential([keras.Input((1,)), keras.layers.Dense(1)]))
    stop.on_epoch_begin(40)
    stop.on_train_batch_end(0, {"loss": 0.28})
    if not diverged:
        stop.on_epoch_end(40, {"loss": epoch_loss})
        return
    with pytest.raises(TransferkitError, match="stage top3, epoch 41") as err:
        stop.on_epoch_end(40, {"loss": epoch_loss})
    assert ("uniform guess" in str(err.value)) == bool(floor)


def test_default_stages_count_steps_not_epochs(encoder_dir):
    from transferkit.finetuning.plan import plan_finetune

    # 0.02 of the training split: one batch of 32 per epoch
    plan = plan_finetune(Recipe(from_=str(encoder_dir), label_fraction=0.02))
    assert len(plan.split.labeled) <= 32
    head, unfreeze = plan.stages
    assert plan.steps(head) >= HEAD_STEPS and plan.steps(unfreeze) >= FINETUNE_STEPS
    assert unfreeze.top == len(plan.clf.blocks)  # every block, as fastai's fine_tune
    assert plan.chosen == {"head_epochs": HEAD_STEPS, "epochs": FINETUNE_STEPS, "lr": 0.01,
                           "unfreeze_top": len(plan.clf.blocks), "finetune_lr_factor": 0.03}
    # all the labels: far more batches per epoch, as many steps, never fewer than MIN_EPOCHS epochs
    plan = plan_finetune(Recipe(from_=str(encoder_dir)))
    per_epoch = math.ceil(len(plan.split.labeled) / 32)
    assert plan.stages[0].epochs == max(MIN_EPOCHS, math.ceil(HEAD_STEPS / per_epoch))


def test_a_backbone_unfreezes_at_the_keras_guides_ratio():
    from transferkit.training.defaults import resolve_finetune

    # the Keras guide: Adam at 1e-3 for the new head, 1e-5 for the whole model
    recipe, chosen = resolve_finetune(Recipe(), labeled=100, num_blocks=5, base_kind="backbone")
    assert chosen["finetune_lr_factor"] == pytest.approx(1e-5 / 1e-3)
    assert resolve_finetune(Recipe(finetune_lr_factor=0.5), 100, 5, "backbone")[0].finetune_lr_factor == 0.5


def test_default_pretraining_is_denoising_on_a_step_budget():
    from transferkit.training.defaults import resolve_pretrain

    # the digits as load_data gives them: 8x8x1 images of 64 values, the wide encoder's inputs
    recipe, chosen = resolve_pretrain(Recipe(), examples=1258, input_shape=load_data("digits").input_shape)
    assert recipe.task == "denoising" and recipe.noise_kind == "dropout"
    assert chosen == {"units": (512, 256, 128),
                      "epochs": min(math.ceil(PRETRAIN_STEPS / math.ceil(1258 / 32)), PRETRAIN_MAX_EPOCHS),
                      "lr": 1e-3}
    assert describe_chosen("pretrain", chosen) == ("pretrain: chosen automatically (set them to change): "
                                                   "--units 512,256,128 --epochs 150 --lr 0.001")


def test_large_inputs_get_the_narrower_encoder_and_given_units_are_kept():
    from transferkit.training.defaults import resolve_pretrain

    # a 512-unit first block on 150x147x3 photos: 34M weights; on a 32x32 RGB image (3,072 values) 1.6M
    assert resolve_pretrain(Recipe(), 126, input_shape=(150, 147, 3))[0].units == (128, 64, 32)
    assert resolve_pretrain(Recipe(), 126, input_shape=(64, 64, 3))[0].units == (128, 64, 32)
    assert resolve_pretrain(Recipe(), 126, input_shape=(32, 32, 3))[0].units == (512, 256, 128)
    assert resolve_pretrain(Recipe(), 126, input_shape=(30,))[0].units == (512, 256, 128)
    # the bound: 4,096 values (a 64x64 grey image) still wide, one more narrow
    assert resolve_pretrain(Recipe(), 126, input_shape=(64, 64, 1))[0].units == (512, 256, 128)
    assert resolve_pretrain(Recipe(), 126, input_shape=(4097,))[0].units == (128, 64, 32)
    recipe, chosen = resolve_pretrain(Recipe(units=(32, 16)), 1258, input_shape=(64,))
    assert recipe.units == (32, 16) and "units" not in chosen


@pytest.mark.parametrize("examples", [144, 1258, 50_000])
def test_pretraining_epochs_make_the_step_budget_within_their_bounds(examples):
    from transferkit.training.defaults import resolve_pretrain

    epochs = resolve_pretrain(Recipe(), examples=examples)[1]["epochs"]
    batches = math.ceil(examples / 32)
    # the fewest epochs that reach the budget, unless that is more passes than the bound or fewer than the floor
    expected = min(max(MIN_EPOCHS, -(-PRETRAIN_STEPS // batches)), PRETRAIN_MAX_EPOCHS)
    assert epochs == expected
    assert epochs * batches >= PRETRAIN_STEPS or epochs == PRETRAIN_MAX_EPOCHS


def test_explicit_settings_are_obeyed_exactly(encoder_dir, tmp_path):
    out = tmp_path / "clf"
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.2, head_epochs=3, epochs=2, unfreeze_top=1,
                         lr=0.004, patience=0, out=str(out), verbose=False)
    assert len(result.history["loss"]) == 3 + 2
    stages = result.manifest["stages"]
    # the factor left unset: the encoder's default, FINETUNE_LR_FACTOR["encoder"]
    assert [(s["name"], s["epochs"], s["lr"]) for s in stages] == [("head", 3, 0.004), ("top1", 2, 0.004 * 0.03)]
    assert "stopped_after" not in stages[0] and "stopped_after" not in stages[1]
    recipe = (out / "recipe.toml").read_text()
    assert "head_epochs = 3" in recipe and "lr = 0.004" in recipe


@pytest.mark.parametrize("flags", [["--lr", "1e30", "--optimizer", "sgd", "--schedule", "constant"],
                                   ["--lr", "1e4"]], ids=["infinite", "finite-blow-up"])
def test_a_diverging_run_stops_with_exit_1_and_writes_nothing(encoder_dir, tmp_path, flags):
    out = tmp_path / "clf"
    base = ["finetune", "--from", str(encoder_dir), "--label-fraction", "0.2", "--head-epochs", "4", "--epochs", "2",
            "--out", str(out)]
    done = run(*base, *flags)
    assert done.exit_code == 1, done.output[-1500:]
    message = done.stderr.strip().splitlines()[-1]
    assert message.startswith("Error: Training diverged in stage head, epoch ")
    assert f"at learning rate {float(flags[1]):.3g}" in message and "--lr auto" in message
    assert not out.exists()
    backup = out.with_name(f".{out.name}.backup")
    assert (backup / "state.json").is_file()
    again = run(*base, "--lr", "0.01", "--restart")
    assert again.exit_code == 0, again.output[-1500:]
    assert (out / "model.keras").is_file() and not backup.exists()


def test_finetune_help_shows_every_default():
    result = CliRunner().invoke(cli, ["finetune", "--help"], terminal_width=200)
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    for option, default in [("--patience", "20"), ("--batch-size", "32"), ("--schedule", "onecycle"),
                            ("--optimizer", "nadam"), ("--unfreeze-top", "every block"),
                            ("--head-epochs", "auto: about 600 optimizer steps"), ("--lr", "0.01]"),
                            ("--epochs", "auto: about 300 optimizer steps per unfreezing stage")]:
        start = text.index(option + " ")
        assert f"[default: {default}" in text[start:text.index("[default:", start) + 80], option
    assert "[default: (" not in text  # written as is, not in Click's parentheses for a string
    assert "pretrain" not in text and "--task" not in text  # finetune's help names only finetune's defaults


def test_pretrain_help_shows_pretraining_defaults():
    text = " ".join(CliRunner().invoke(cli, ["pretrain", "--help"], terminal_width=200).output.split())
    assert "[default: 0.001, 0.0002 for --task gan]" in text
    assert "[default: auto: about 6000 optimizer steps (at most 150 epochs, at least 5)]" in text


def test_the_first_line_says_what_was_chosen(encoder_dir, tmp_path):
    done = run("finetune", "--from", str(encoder_dir), "--label-fraction", "0.2", "--head-epochs", "2",
                   "--epochs", "1", "--out", str(tmp_path / "clf"))
    assert done.exit_code == 0, done.output[-1500:]
    assert done.stdout.splitlines()[0] == ("finetune: chosen automatically (set them to change): "
                                           "--lr 0.01 --unfreeze-top 3 --finetune-lr-factor 0.03")


def test_tensorboard_gets_the_curves_of_every_stage(encoder_dir, tmp_path):
    import tensorflow as tf

    logs = tmp_path / "tb"
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.2, head_epochs=2, epochs=1, unfreeze_top=1, lr=0.01,
                         patience=0, tensorboard=str(logs), out=str(tmp_path / "clf"), verbose=False)
    losses = {}
    for part in ("train", "validation"):
        for path in (logs / part).glob("events.out.tfevents.*"):
            for event in tf.compat.v1.train.summary_iterator(str(path)):
                for value in event.summary.value:
                    if value.tag == "epoch_loss":
                        losses.setdefault(part, {})[event.step] = float(tf.make_ndarray(value.tensor))
    # one point per epoch of both stages, on one axis, equal to the history's
    assert sorted(losses["train"]) == [0, 1, 2]
    np.testing.assert_allclose([losses["train"][e] for e in range(3)], result.history["loss"], rtol=1e-6)
    np.testing.assert_allclose([losses["validation"][e] for e in range(3)], result.history["val_loss"], rtol=1e-6)


def test_a_base_whose_features_do_not_vary_is_named(encoder_dir, tmp_path, capsys):
    from transferkit.finetuning.feature_cache import compute_features
    from transferkit.finetuning.plan import plan_finetune

    # a random MobileNetV2 keeps BatchNorm's initial statistics: its features vanish for every input
    settings = dict(backbone="mobilenetv2", weights="none", label_fraction=0.05)
    plan = plan_finetune(Recipe(**settings))
    features = compute_features(plan.clf.features, plan.data.x[plan.split.labeled], 32)
    assert np.std(features, axis=0).max() < 1e-6  # computed here: the premise holds
    tk.finetune(**settings, head_epochs=1, epochs=0, lr=0.01, out=str(tmp_path / "flat"), verbose=False)
    assert "warning: the features of mobilenetv2 (weights none)" in capsys.readouterr().err
    tk.finetune(from_=str(encoder_dir), label_fraction=0.05, head_epochs=1, epochs=0, lr=0.01,
                out=str(tmp_path / "fine"), verbose=False)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_default_runs_with_propagate_do_not_diverge_where_a_tenth_did(tmp_path):
    # seed 0, 10% labels: unfreezing the default encoder at a tenth of the rate spiked to a loss of 24 and stopped
    encoder = tk.pretrain(data="digits", seed=0, out=str(tmp_path / "encoder"), verbose=False).artifact
    result = tk.finetune(from_=str(encoder), label_fraction=0.1, seed=0, semi_supervised="propagate",
                         out=str(tmp_path / "clf"), verbose=False)
    head_epochs = result.manifest["stages"][0].get("stopped_after") or result.manifest["stages"][0]["epochs"]
    assert max(result.history["loss"][head_epochs:]) < 2 * np.log(10)  # no spike: within twice a uniform guess
