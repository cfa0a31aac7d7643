"""--augment: random image augmentation inside the model that changes training inputs and never inference; --tta."""

import shutil

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.pieces.augment_spec import parse_augment
from transferkit.pieces.augmentation import Augmentation, tta_predict
from transferkit.errors import SettingsError

from helpers import assert_config_round_trip, assert_reloads_with_same_outputs, digit_images

# class weights, MixUp/CutMix, EMA, augmentation and TTA hold on every backend: `make test-jax` runs these
pytestmark = pytest.mark.backend_neutral


def test_presets_and_words_parse_to_the_keras_layers_settings():
    assert parse_augment("none") == ()
    assert parse_augment("flip, rotate:15") == (("flip", None), ("rotate", 15.0))
    assert parse_augment("light,contrast:0.3")[-1] == ("contrast", 0.3)
    layer = Augmentation("flip,rotate:18,zoom:0.2,translate:0.1,contrast:0.3,randaugment", value_range=(0, 16))
    flip, rotate, zoom, translate, contrast, rand = layer.steps
    assert flip.mode == "horizontal"
    assert rotate.factor == (-0.05, 0.05)  # 18 degrees of a 360-degree turn
    assert zoom.height_factor == (-0.2, 0.2)
    assert (translate.height_factor, translate.width_factor) == (0.1, 0.1)
    assert tuple(contrast.value_range) == (0, 16) and tuple(rand.value_range) == (0, 16)


@pytest.mark.parametrize("spec, words", [
    ("blur", "'blur' is not one of them. Received: augment='blur'"),
    ("rotate", "needs a number (degrees) after 'rotate:'"),
    ("flip:2", "'flip' takes no value"),
    ("zoom:1.5", "needs F in (0, 1]"),
])
def test_a_bad_augment_word_is_refused_naming_it(spec, words):
    with pytest.raises(SettingsError) as err:
        tk.Recipe().replace(augment=spec)
    assert words in str(err.value)


def test_augmentation_is_off_unless_training_and_changes_images_in_training():
    x = digit_images()
    layer = Augmentation("light", value_range=(0.0, 16.0), seed=3)
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x)), x)  # no training flag: inference
    assert np.array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    trained = keras.ops.convert_to_numpy(layer(x, training=True))
    assert trained.shape == x.shape and not np.allclose(trained, x)


def test_augmentation_does_not_leak_training_mode_to_the_layers_after_it():
    # Keras's random layers default to training=True; called plainly, a model with them inside would put the
    # dropout after them in training mode (PITFALLS 1). Ours defaults to inference.
    inputs = keras.Input((8, 8, 1))
    x = Augmentation("flip", seed=0)(inputs)
    model = keras.Model(inputs, keras.layers.Dropout(0.9)(keras.layers.Flatten()(x)))
    x = digit_images()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), x.reshape(len(x), -1))


def test_augmentation_config_round_trips_and_saves_with_a_model(tmp_path):
    layer = Augmentation("medium", value_range=(0.0, 16.0), seed=7)
    assert_config_round_trip(layer)
    inputs = keras.Input((8, 8, 1))
    model = keras.Model(inputs, keras.layers.Dense(3)(keras.layers.Flatten()(layer(inputs))))
    reloaded = assert_reloads_with_same_outputs(model, digit_images(), tmp_path)
    assert reloaded.get_layer(layer.name).spec == layer.spec


def test_augmentation_refuses_vector_inputs_in_one_line(tmp_path):
    np.savez(tmp_path / "vectors.npz", x=np.random.default_rng(0).normal(size=(60, 5)).astype("float32"),
             y=np.arange(60) % 2)
    enc = tk.pretrain(data=f"npz:{tmp_path}/vectors.npz", epochs=1, units=(4,), out=str(tmp_path / "enc"),
                      verbose=False).artifact
    with pytest.raises(SettingsError, match=r"--augment needs image inputs .* shape \(5,\)"):
        tk.finetune(from_=str(enc), data=f"npz:{tmp_path}/vectors.npz", augment="light", head_epochs=1, epochs=1,
                    out=str(tmp_path / "clf"), verbose=False)
    assert not (tmp_path / "clf").exists()


def without_augmentation(model: keras.Model) -> keras.Model:
    """The same layers (and weights) as `model`, its Augmentation left out: inputs -> base -> ... -> head."""
    inputs = keras.Input(model.inputs[0].shape[1:])
    x = inputs
    for layer in model.layers[1:]:
        if not isinstance(layer, Augmentation):
            x = layer(x)
    return keras.Model(inputs, x)


@pytest.fixture(scope="module")
def augmented_dir(tmp_path_factory, encoder_dir):
    out = tmp_path_factory.mktemp("augmented") / "classifier"
    return tk.finetune(from_=str(encoder_dir), label_fraction=0.1, head_epochs=2, epochs=1, unfreeze_top=1,
                       dropout=0.0, lr=0.01, augment="light", out=str(out), verbose=False).artifact


def test_augmented_model_in_inference_equals_the_model_without_it(augmented_dir):
    model = tk.load_model(augmented_dir)
    assert isinstance(model.get_layer("augmentation"), Augmentation)
    plain = without_augmentation(model)
    x = digit_images(64)
    expected = keras.ops.convert_to_numpy(plain(x, training=False))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x, training=False)), expected)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(model(x)), expected)
    np.testing.assert_array_equal(model.predict(x, verbose=0), plain.predict(x, verbose=0))
    # in training (no dropout here) the only difference is the augmented inputs
    assert not np.allclose(keras.ops.convert_to_numpy(model(x, training=True)), expected)


def test_head_stages_run_uncached_when_augmenting(augmented_dir):
    import json

    manifest = json.loads((augmented_dir / "manifest.json").read_text())
    assert [s["cached"] for s in manifest["stages"]] == [False, False]
    assert manifest["augment"] == "rotate:10,zoom:0.1,translate:0.1"


def test_exported_serve_gives_exactly_the_unaugmented_models_outputs(augmented_dir, tmp_path):
    import tensorflow as tf

    plain_dir = tmp_path / "plain"
    shutil.copytree(augmented_dir, plain_dir, ignore=shutil.ignore_patterns("serving"))
    plain = without_augmentation(tk.load_model(augmented_dir))
    plain.save(plain_dir / "model.keras")
    tk.export(augmented_dir, tmp_path / "served-augmented", verbose=False)
    tk.export(plain_dir, tmp_path / "served-plain", verbose=False)
    x = tf.constant(np.random.default_rng(0).uniform(0, 16, size=(32, 8, 8, 1)).astype("float32"))
    outputs = [tf.saved_model.load(str(tmp_path / name)).signatures["serve"](inputs=x)["probabilities"].numpy()
               for name in ("served-augmented", "served-plain")]
    np.testing.assert_array_equal(*outputs)
    np.testing.assert_allclose(outputs[0], keras.ops.convert_to_numpy(plain(x, training=False)), atol=1e-6)


def test_tta_averages_the_input_and_flipped_copies_with_dropout_off(dropout_classifier_dir):
    # a model without augmentation: each copy is the image or its mirror, and dropout (0.3 here) stays off
    model = tk.load_model(dropout_classifier_dir)
    x = digit_images(200)
    plain = model.predict(x, verbose=0)
    mirrored = model.predict(x[:, :, ::-1, :], verbose=0)
    averaged = tta_predict(model, x, copies=2)
    as_is = np.abs(averaged - plain).max(axis=1) < 1e-5
    flipped = np.abs(averaged - (plain + mirrored) / 2).max(axis=1) < 1e-5
    assert np.all(as_is | flipped)
    assert 0.3 < flipped.mean() < 0.7  # a fair coin per copy
    np.testing.assert_allclose(tta_predict(model, x, copies=1), plain, atol=1e-6)


def test_evaluate_and_predict_report_tta_beside_the_plain_figures(augmented_dir):
    result = tk.evaluate(augmented_dir, tta=3, verbose=False)
    assert set(result.report["predictions"]) == {"deterministic", "tta"}
    assert {"accuracy", "tta_accuracy", "tta_nll"} <= set(result.metrics)
    rows = tk.predict(augmented_dir, "digits", tta=3, verbose=False)
    assert {"class", "probability", "tta_class", "tta_probability"} <= set(rows[0])
    with pytest.raises(SettingsError, match=r"--tta must be at least 1 .*Received: tta=0"):
        tk.evaluate(augmented_dir, tta=0, verbose=False)
