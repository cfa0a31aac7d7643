"""Export: the SavedModel serves raw inputs and matches the Keras model."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit import serving
from transferkit.data import load_data
from transferkit.errors import TransferkitError


@pytest.fixture(scope="module")
def exported(classifier_dir):
    return tk.export(classifier_dir, verbose=False).artifact


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
