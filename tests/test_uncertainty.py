"""MC dropout prediction, calibration metrics, predict and the serve_mc export."""

import json
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.data.sources import load_data
from transferkit.pieces.uncertainty import calibration, mc_predict, summarize_samples
from tests.test_cli import run


def small_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,))
    h = keras.layers.Dense(16, name="d1")(inputs)
    h = keras.layers.BatchNormalization(name="bn")(h)
    h = keras.layers.Dropout(0.5, name="drop")(h)
    outputs = keras.layers.Dense(3, activation="softmax", name="d2")(h)
    model = keras.Model(inputs, outputs)
    bn = model.get_layer("bn")
    bn.moving_mean.assign(np.full(16, 0.5, "float32"))
    bn.moving_variance.assign(np.full(16, 2.0, "float32"))
    return model


def test_mc_mean_agrees_with_a_plain_loop_with_dropout_on_and_batchnorm_in_inference():
    model = small_model()
    x = np.random.default_rng(0).normal(size=(5, 6)).astype("float32")
    d1, bn, drop, d2 = (model.get_layer(n) for n in ("d1", "bn", "drop", "d2"))
    # 2000 draws, layer by layer: 20 calls on x repeated 100 times (each row its own dropout mask)
    tiled = np.tile(x, (100, 1))
    loop = np.mean([keras.ops.convert_to_numpy(d2(drop(bn(d1(tiled), training=False), training=True)))
                    .reshape(100, *x.shape[:1], -1) for _ in range(20)], axis=(0, 1))
    ours = mc_predict(model, x, samples=2000)
    np.testing.assert_allclose(ours.mean, loop, atol=0.02)
    # and it is not the deterministic answer, nor the answer with BatchNorm on batch statistics
    assert np.abs(ours.mean - keras.ops.convert_to_numpy(model(x, training=False))).max() > 0.02
    # x repeated has x's batch statistics (the same mean and population variance)
    batch_stats = np.mean(keras.ops.convert_to_numpy(model(np.tile(x, (500, 1)), training=True))
                          .reshape(500, *x.shape[:1], -1), axis=0)
    assert np.abs(ours.mean - batch_stats).max() > 0.05


def test_mc_predictions_vary_and_batchnorm_statistics_stay():
    model = small_model()
    x = np.random.default_rng(1).normal(size=(4, 6)).astype("float32")
    before = [w.numpy().copy() for w in model.get_layer("bn").weights]
    a, b = mc_predict(model, x, samples=5), mc_predict(model, x, samples=5)
    assert not np.allclose(a.mean, b.mean)
    for w, then in zip(model.get_layer("bn").weights, before):
        np.testing.assert_array_equal(w.numpy(), then)


def test_uncertainty_figures_follow_their_definitions():
    samples = np.random.default_rng(2).dirichlet([1.0, 2.0, 3.0], size=(50, 4)).astype("float32")
    mean_, std, entropy_, mutual = (keras.ops.convert_to_numpy(v) for v in summarize_samples(samples))
    mean = samples.mean(axis=0)
    entropy = -(mean * np.log(mean)).sum(axis=1)
    expected_entropy = -(samples * np.log(samples)).sum(axis=2).mean(axis=0)
    np.testing.assert_allclose(mean_, mean, atol=1e-6)
    np.testing.assert_allclose(std, samples.std(axis=0), atol=1e-6)
    np.testing.assert_allclose(entropy_, entropy, atol=1e-5)
    np.testing.assert_allclose(mutual, entropy - expected_entropy, atol=1e-5)
    assert np.all(mutual >= -1e-6)  # Jensen: the entropy of the mean is at least the mean entropy


def test_calibration_metrics_match_a_hand_computation():
    p = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    y = np.array([0, 1, 1, 1])
    # confidences 0.9, 0.8, 0.7, 0.6; correct: yes, no, yes, yes
    # 15 bins of width 1/15: each confidence sits in its own bin
    # ECE = (|1-0.9| + |0-0.8| + |1-0.7| + |1-0.6|) / 4 = 1.6 / 4
    nll = -(np.log(0.9) + np.log(0.2) + np.log(0.7) + np.log(0.6)) / 4
    assert calibration(p, y) == pytest.approx({"accuracy": 0.75, "nll": nll, "ece": 0.4})
    # two bins: [0, 0.5], (0.5, 1]: all four in the upper one: |0.75 - 0.75| = 0
    assert calibration(p, y, bins=2)["ece"] == pytest.approx(0.0)


def test_evaluate_reports_deterministic_and_mc_side_by_side(dropout_classifier_dir):
    result = run("evaluate", dropout_classifier_dir, "--mc-samples", "10")
    assert result.exit_code == 0, result.output
    header = [line for line in result.output.splitlines() if line.startswith("metric")][0]
    assert "deterministic" in header and "MC dropout (10 samples)" in header
    assert {line.split()[0] for line in result.output.splitlines()} >= {"accuracy", "nll", "ece"}


def test_predict_writes_csv_and_json(dropout_classifier_dir, tmp_path):
    x = load_data("digits").x[:4]
    np.savez(tmp_path / "new.npz", x=x)
    result = run("predict", dropout_classifier_dir, f"npz:{tmp_path}/new.npz")
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "input,class,probability" and len(result.output.splitlines()) == 5
    result = run("predict", dropout_classifier_dir, f"npz:{tmp_path}/new.npz", "--mc-samples", "8",
                 "--output", tmp_path / "out.json")
    assert result.exit_code == 0, result.output
    rows = json.loads((tmp_path / "out.json").read_text())
    assert len(rows) == 4 and set(rows[0]) == {"input", "class", "probability", "std", "entropy",
                                               "mutual_information"}


def test_predict_reads_image_files(classifier_dir, tmp_path):
    from PIL import Image

    for i in range(2):
        Image.fromarray(np.full((8, 8), 200 * i, np.uint8), mode="L").save(tmp_path / f"{i}.png")
    rows = tk.predict(classifier_dir, [str(tmp_path / "0.png"), str(tmp_path / "1.png")], verbose=False)
    assert [r["input"] for r in rows] == [str(tmp_path / "0.png"), str(tmp_path / "1.png")]


def test_mc_samples_on_a_model_without_dropout_is_refused(classifier_dir):
    result = run("evaluate", classifier_dir, "--mc-samples", "5")
    assert result.exit_code == 2 and "needs a model with dropout" in result.output


@pytest.fixture(scope="module")
def mc_export(dropout_classifier_dir):
    return tk.export(dropout_classifier_dir, mc_samples=20, verbose=False).artifact


def test_serve_mc_runs_in_a_process_that_imports_only_tensorflow(mc_export):
    code = (
        "import sys, tensorflow as tf\n"
        f"m = tf.saved_model.load({str(mc_export)!r})\n"
        "out = m.signatures['serve_mc'](inputs=tf.zeros((3, 8, 8, 1)))\n"
        "p = m.signatures['serve'](inputs=tf.zeros((3, 8, 8, 1)))['probabilities']\n"
        "print(sorted(out), list(out['mean'].shape), list(p.shape), 'transferkit' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "['entropy', 'mean', 'std'] [3, 10] [3, 10] False"


def test_saved_model_cli_lists_both_signatures(mc_export):
    cli = Path(sys.executable).parent / "saved_model_cli"
    out = subprocess.run([str(cli), "show", "--dir", str(mc_export), "--all"], capture_output=True, text=True,
                         check=True).stdout
    signatures = {part.split("']")[0]: part for part in out.split("signature_def['")[1:]}
    assert {"serve", "serve_mc", "serving_default"} <= set(signatures)
    for name, outputs in (("serve", ["probabilities"]), ("serve_mc", ["entropy", "mean", "std"])):
        text = signatures[name]
        assert "inputs['inputs'] tensor_info:\n        dtype: DT_FLOAT\n        shape: (-1, 8, 8, 1)" in text
        for output in outputs:
            assert f"outputs['{output}'] tensor_info:\n        dtype: DT_FLOAT" in text


def test_serve_converts_to_tflite_with_the_same_predictions(mc_export, dropout_classifier_dir):
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(mc_export), signature_keys=["serve"])
    interpreter = tf.lite.Interpreter(model_content=converter.convert())
    runner = interpreter.get_signature_runner("serve")
    x = load_data("digits").x[:1]
    got = runner(inputs=x)["probabilities"]
    model = keras.saving.load_model(Path(dropout_classifier_dir) / "model.keras")
    np.testing.assert_allclose(got, keras.ops.convert_to_numpy(model(x, training=False)), atol=1e-5)
