"""Fine-tuning: what each stage may change, BatchNorm, the split, the artifact."""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.pieces.backbones import blocks_of
from transferkit.data.sources import load_data, split_data
from transferkit.errors import SettingsError


def encoder_weights(path):
    encoder = keras.saving.load_model(Path(path) / "model.keras")
    return {w.path: keras.ops.convert_to_numpy(w) for w in encoder.weights}, encoder


def base_of(model):
    return model.get_layer("encoder")


def finetuned(path, tmp_path, **settings):
    defaults = dict(from_=str(path), label_fraction=0.2, head_epochs=2, epochs=2, lr=0.01, out=str(tmp_path / "clf"),
                    verbose=False)
    return tk.finetune(**{**defaults, **settings})


def test_head_only_leaves_every_base_weight_bit_identical(bn_encoder_dir, tmp_path):
    before, _ = encoder_weights(bn_encoder_dir)
    result = finetuned(bn_encoder_dir, tmp_path, unfreeze_top=0)
    after = {w.path: keras.ops.convert_to_numpy(w) for w in base_of(result.model).weights}
    assert before.keys() == after.keys()
    for name in before:
        np.testing.assert_array_equal(after[name], before[name], err_msg=name)


@pytest.mark.backend_neutral
def test_unfreeze_top_changes_only_top_blocks_and_head(bn_encoder_dir, tmp_path):
    before, encoder = encoder_weights(bn_encoder_dir)
    blocks = [name for name, _ in blocks_of(encoder)]
    assert blocks == ["block1", "block2", "block3"]
    result = finetuned(bn_encoder_dir, tmp_path, unfreeze_top=2)
    base = base_of(result.model)
    for layer in base.layers:
        for w in layer.weights:
            now, then = keras.ops.convert_to_numpy(w), before[w.path]
            in_top = layer.name.startswith(("encoder_block2_", "encoder_block3_"))
            if in_top and not isinstance(layer, keras.layers.BatchNormalization):
                assert not np.array_equal(now, then), f"{w.path} should have trained"
            else:
                # frozen layers, and every BatchNorm (gamma, beta and moving statistics), stay as they were
                np.testing.assert_array_equal(now, then, err_msg=f"{w.path} changed")
    assert result.manifest["stages"][1]["unfreeze_top"] == 2


def test_frozen_batchnorm_runs_in_inference_mode(bn_encoder_dir, tmp_path):
    result = finetuned(bn_encoder_dir, tmp_path, unfreeze_top=3, head_epochs=0, epochs=1, dropout=0.0)
    x = load_data("digits").x[:16]
    # training=True must give the same outputs as inference where only BN could differ (no dropout here)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(result.model(x, training=True)),
        keras.ops.convert_to_numpy(result.model(x, training=False)), atol=1e-6)


def test_no_pretraining_or_finetuning_example_comes_from_the_test_split(encoder_dir, classifier_dir):
    pre = json.loads((Path(encoder_dir) / "split.json").read_text())
    fine = json.loads((Path(classifier_dir) / "split.json").read_text())
    assert not set(pre["train"]) & set(fine["test"])
    assert not set(fine["labeled"]) & set(fine["test"])
    assert set(fine["labeled"]) <= set(fine["train"])
    # and the recorded split is the one the seed gives
    data = load_data("digits")
    manifest = json.loads((Path(classifier_dir) / "manifest.json").read_text())
    again = split_data(data, seed=manifest["split"]["seed"], label_fraction=manifest["split"]["label_fraction"])
    np.testing.assert_array_equal(again.test, fine["test"])


def test_a_split_seed_that_leaks_test_examples_is_refused(encoder_dir, tmp_path):
    with pytest.raises(SettingsError, match="test examples among the encoder's pretraining inputs"):
        finetuned(encoder_dir, tmp_path, split_seed=5)
    assert not (tmp_path / "clf").exists()


def test_classifier_artifact_records_metrics_split_and_versions(classifier_dir):
    manifest = json.loads((Path(classifier_dir) / "manifest.json").read_text())
    assert manifest["kind"] == "classifier"
    assert 0 <= manifest["metrics"]["test_accuracy"] <= 1
    assert manifest["split"]["sizes"]["labeled"] == round(0.1 * manifest["split"]["sizes"]["train"])
    assert {"tensorflow", "keras", "transferkit"} <= set(manifest["versions"])
    assert (Path(classifier_dir) / "recipe.toml").is_file()


def test_reloaded_encoder_gives_the_same_outputs(encoder_dir):
    data = load_data("digits")
    encoder = keras.saving.load_model(Path(encoder_dir) / "model.keras")
    again = keras.saving.load_model(Path(encoder_dir) / "model.keras")
    x = data.x[:32]
    np.testing.assert_allclose(keras.ops.convert_to_numpy(again(x)), keras.ops.convert_to_numpy(encoder(x)),
                               atol=1e-6)
    # the saved encoder standardizes raw inputs with the training split's statistics
    manifest = json.loads((Path(encoder_dir) / "manifest.json").read_text())
    split = json.loads((Path(encoder_dir) / "split.json").read_text())
    mean = data.x[split["train"]].mean()
    np.testing.assert_allclose(manifest["normalization"]["mean"], [mean], rtol=1e-5)


def test_finetune_learns_digits_from_few_labels(encoder_dir, tmp_path):
    result = finetuned(encoder_dir, tmp_path, label_fraction=0.3, head_epochs=10, epochs=40, unfreeze_top=3,
                       finetune_lr_factor=1.0)
    # ten classes: chance is 0.1; fine-tuning every block of even a tiny encoder does far better
    assert result.metrics["test_accuracy"] > 0.5


def test_head_stage_stops_when_val_loss_stalls_and_keeps_its_best_weights(encoder_dir, tmp_path):
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.5, val_fraction=0.2, head_epochs=400, epochs=0,
                         head_patience=3, lr=0.3, schedule="constant", batch_size=64, out=str(tmp_path / "c"),
                         verbose=False)
    stage = result.manifest["stages"][0]
    val_losses = result.history["val_loss"]
    assert stage["stopped_after"] == len(val_losses) < 400
    best = int(np.argmin(val_losses))
    assert stage["best_epoch"] == best + 1 and len(val_losses) - 1 - best == 3  # patience epochs after the best
    # the saved classifier is the best epoch's: its validation loss is that epoch's
    data = load_data("digits")
    split = json.loads((result.artifact / "split.json").read_text())
    model = tk.load_model(result.artifact)
    model.compile(loss="sparse_categorical_crossentropy")
    val = np.asarray(split["val"])
    reloaded_loss = model.evaluate(data.x[val], data.y[val], verbose=0, return_dict=True)["loss"]
    assert reloaded_loss == pytest.approx(val_losses[best], rel=1e-4)


def test_the_head_starts_at_a_uniform_guess_however_large_the_base_outputs(tmp_path):
    from transferkit.finetuning.plan import plan_finetune
    from transferkit.recipe import Recipe

    # a base whose pooled outputs run to the tens of thousands: a head drawn at random starts far from any guess
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(8, 3, kernel_initializer=keras.initializers.RandomUniform(0.0, 10.0), name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    outputs = keras.layers.Dense(10, activation="softmax", name="classes")(x)
    keras.Model(inputs, outputs).save(tmp_path / "large.keras")
    clf = plan_finetune(Recipe().replace(data="digits", base=str(tmp_path / "large.keras"), head_epochs=1,
                                         epochs=0)).clf
    data = load_data("digits")
    images = data.x[:64].reshape(-1, 8, 8, 1)
    assert float(np.abs(keras.ops.convert_to_numpy(clf.features(images))).min()) > 1000
    probabilities = keras.ops.convert_to_numpy(clf.model(images))
    np.testing.assert_allclose(probabilities, 0.1, atol=1e-6)  # K = 10 classes: each 1/K, a loss of ln K
    loss = keras.losses.SparseCategoricalCrossentropy()(data.y[:64], probabilities)
    assert float(loss) == pytest.approx(np.log(10), rel=1e-5)
    # and the head learns: one plain gradient step raises the probability of each true class on average
    clf.model.compile(optimizer=keras.optimizers.SGD(1e-6), loss="sparse_categorical_crossentropy")
    clf.model.train_on_batch(images, data.y[:64])
    after = keras.ops.convert_to_numpy(clf.model(images))[np.arange(64), data.y[:64]]
    assert after.mean() > 0.1


def test_an_encoders_model_file_is_refused_for_its_folder(encoder_dir, tmp_path):
    # the folder holds the split that keeps the encoder's pretraining rows out of the test split
    with pytest.raises(SettingsError, match="is a file; expected the encoder's folder"):
        tk.finetune(from_=str(Path(encoder_dir) / "model.keras"), label_fraction=0.2, head_epochs=1, epochs=0,
                    out=str(tmp_path / "clf"), verbose=False)
    assert not (tmp_path / "clf").exists()
