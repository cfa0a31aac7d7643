"""Export: the SavedModel serves raw inputs and matches the Keras model."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.commands import export as serving
from transferkit.data.sources import load_data
from transferkit.errors import TransferkitError


@pytest.fixture(scope="module")
def exported(classifier_dir):
    return tk.export(classifier_dir, verbose=False).artifact


@pytest.mark.backend_neutral
def test_serve_matches_the_keras_model_on_real_digits(classifier_dir, exported):
    import tensorflow as tf

    model = keras.saving.load_model(Path(classifier_dir) / "model.keras")
    serve = tf.saved_model.load(str(exported)).signatures["serve"]
    x = load_data("digits").x
    for batch in (x[:5], x[100:164]):
        expected = keras.ops.convert_to_numpy(model(batch, training=False))
        got = serve(inputs=tf.constant(batch))["probabilities"].numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)


@pytest.mark.backend_neutral
def test_saved_model_runs_in_a_process_that_imports_only_tensorflow(exported):
    code = (
        "import sys, tensorflow as tf\n"
        f"sig = tf.saved_model.load({str(exported)!r}).signatures['serve']\n"
        "spec = sig.structured_input_signature[1]['inputs']\n"
        "out = sig(inputs=tf.zeros((3, 8, 8, 1)))['probabilities']\n"
        "print(spec.dtype.name, list(spec.shape), list(out.shape), 'transferkit' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "float32 [None, 8, 8, 1] [3, 10] False"


def test_a_failed_check_keeps_the_previous_export(classifier_dir, exported, monkeypatch):
    before = sorted(p.name for p in Path(exported).iterdir())

    def broken(*args, **kwargs):
        raise TransferkitError("differs")

    monkeypatch.setattr(serving, "check_export", broken)
    with pytest.raises(TransferkitError):
        tk.export(classifier_dir, verbose=False)
    assert sorted(p.name for p in Path(exported).iterdir()) == before
    leftovers = [p.name for p in Path(classifier_dir).iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_encoder_exports_features(encoder_dir, tmp_path):
    import tensorflow as tf

    out = tk.export(encoder_dir, tmp_path / "serving", verbose=False).artifact
    manifest = json.loads((Path(encoder_dir) / "manifest.json").read_text())
    got = tf.saved_model.load(str(out)).signatures["serve"](inputs=tf.zeros((2, 8, 8, 1)))["features"]
    assert list(got.shape) == [2, *manifest["output_shape"]]


def test_a_fresh_process_loads_a_classifier_trained_with_every_registered_piece(encoder_dir, tmp_path):
    # 1cycle schedule, per-block rates (a Discriminative optimizer), MC dropout in the head
    out = tmp_path / "clf"
    tk.finetune(from_=str(encoder_dir), unfreeze_top=2, lr_decay=2.0, dropout=0.2, mc_dropout=True, head_epochs=1,
                epochs=1, label_fraction=0.1, out=str(out), verbose=False)
    code = (f"import transferkit, keras; m = transferkit.load_model({str(out)!r}); "
            f"k = keras.models.load_model({str(out / 'model.keras')!r}); "
            "print(type(m.optimizer).__name__, type(k.optimizer).__name__)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "DiscriminativeNadam DiscriminativeNadam"


@pytest.fixture(scope="module")
def mc_conv_dir(tmp_path_factory):
    """A conv classifier with BatchNorm and MC dropout (on at inference) before its head."""
    out = tmp_path_factory.mktemp("mc-conv")
    tk.pretrain(data="digits", arch="conv", filters=(4, 8), activation="relu", batchnorm="after", epochs=1,
                batch_size=64, out=str(out / "encoder"), verbose=False)
    return tk.finetune(from_=str(out / "encoder"), label_fraction=0.2, head_epochs=1, epochs=1, unfreeze_top=1,
                       dropout=0.5, mc_dropout=True, out=str(out / "classifier"), verbose=False).artifact


@pytest.fixture(scope="module")
def mc_conv_export(mc_conv_dir):
    import tensorflow as tf

    return tf.saved_model.load(str(tk.export(mc_conv_dir, mc_samples=10, verbose=False).artifact)).signatures


@pytest.mark.backend_neutral
def test_serve_is_deterministic_with_mc_dropout_off_and_batchnorm_in_inference_mode(mc_conv_dir, mc_conv_export):
    import tensorflow as tf

    model = keras.saving.load_model(Path(mc_conv_dir) / "model.keras")
    assert type(model.get_layer("head_dropout")).__name__ == "MCDropout"
    x = load_data("digits").x[:16]
    first, second = (mc_conv_export["serve"](inputs=tf.constant(x))["probabilities"].numpy() for _ in range(2))
    np.testing.assert_array_equal(first, second)
    # expected: features with BatchNorm on its moving statistics, then the head's softmax without dropout, in numpy
    features = keras.Model(model.input, model.get_layer("head_dropout").input)(x, training=False)
    kernel, bias = model.get_layer("head").get_weights()
    logits = keras.ops.convert_to_numpy(features).astype("float64") @ kernel + bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    np.testing.assert_allclose(first, expected / expected.sum(axis=1, keepdims=True), rtol=1e-4, atol=1e-6)
    one_by_one = np.concatenate([mc_conv_export["serve"](inputs=tf.constant(x[i:i + 1]))["probabilities"].numpy()
                                 for i in range(4)])
    np.testing.assert_allclose(one_by_one, first[:4], atol=1e-6)


@pytest.mark.backend_neutral
def test_serve_mc_differs_between_calls(mc_conv_export):
    import tensorflow as tf

    x = tf.constant(load_data("digits").x[:8])
    first, second = (mc_conv_export["serve_mc"](inputs=x) for _ in range(2))
    assert np.max(np.abs(first["mean"].numpy() - second["mean"].numpy())) > 1e-3
    assert np.all(first["std"].numpy().max(axis=1) > 0)


@pytest.mark.backend_neutral
def test_an_empty_batch_gives_empty_outputs(mc_conv_export):
    import tensorflow as tf

    empty = tf.zeros((0, 8, 8, 1))
    assert list(mc_conv_export["serve"](inputs=empty)["probabilities"].shape) == [0, 10]
    shapes = {k: list(v.shape) for k, v in mc_conv_export["serve_mc"](inputs=empty).items()}
    assert shapes == {"mean": [0, 10], "std": [0, 10], "entropy": [0]}


@pytest.mark.backend_neutral
def test_inputs_of_another_shape_are_refused_with_an_error(mc_conv_dir, mc_conv_export):
    # in a fresh process: under oneDNN a convolution fed the wrong rank can abort the process (PITFALLS 16)
    code = (
        "import json, tensorflow as tf\n"
        f"signatures = tf.saved_model.load({str(Path(mc_conv_dir) / 'serving')!r}).signatures\n"
        "answers = {}\n"
        "for name in ('serve', 'serve_mc'):\n"
        "    for shape in ((8, 8, 1), (2, 9, 9, 1), (2, 8, 8, 3), (2, 8, 8, 1, 1)):\n"
        "        try:\n"
        "            answers[f'{name} ' + ','.join(map(str, shape))] = str(signatures[name](inputs=tf.zeros(shape)))\n"
        "        except tf.errors.InvalidArgumentError as err:\n"
        "            answers[f'{name} ' + ','.join(map(str, shape))] = err.message\n"
        "print(json.dumps(answers))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answers) == 8
    for call, answer in answers.items():
        shape = call.split()[1]
        assert f"Shape of tensor inputs [{shape}] is not compatible with expected shape [?,8,8,1]" in answer, answer


def features_export(tmp_path, bias_shift: float) -> Path:
    """A SavedModel of a linear model with outputs near 1000, its bias shifted by `bias_shift`."""
    import tensorflow as tf

    kernel = np.full((4, 3), 500.0, "float32")
    shifted = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    shifted.set_weights([kernel, np.full(3, bias_shift, "float32")])
    archive = keras.export.ExportArchive()
    archive.track(shifted)
    archive.add_endpoint("serve", lambda inputs: {"features": shifted(inputs)},
                         [tf.TensorSpec((None, 4), tf.float32, name="inputs")])
    archive.write_out(str(tmp_path / "serving"), verbose=False)
    reference = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    reference.set_weights([kernel, np.zeros(3, "float32")])
    return tmp_path / "serving", reference


def test_the_check_allows_round_off_scaled_to_the_output_and_refuses_a_wrong_export(tmp_path):
    manifest = SimpleNamespace(input_shape=[4], value_range=[0.5, 1.0])  # outputs between 1000 and 2000
    # 5e-4 is 50 times an absolute 1e-5, but 2.5e-7 to 5e-7 of the output (float32 round-off is ~6e-8 of it)
    path, reference = features_export(tmp_path / "round-off", 5e-4)
    worst = serving.check_export(path, reference, manifest, "features")
    assert 5e-4 / 2000 * 0.8 < worst < 5e-4 / 1000 * 1.2
    path, reference = features_export(tmp_path / "wrong", 20.0)  # 1% of the output
    with pytest.raises(TransferkitError, match="differs from the Keras model by 20"):
        serving.check_export(path, reference, manifest, "features")
