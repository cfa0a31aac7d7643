"""ONNX and LiteRT exports: each reloads in its own runtime and matches the Keras model, computed here independently."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import transferkit as tk
from transferkit.commands import export_checks, export_formats
from transferkit.cli import cli
from transferkit.data.sources import Split, load_data
from transferkit.errors import TransferkitError
from transferkit.commands.runners import open_endpoint
from transferkit.pieces.uncertainty import deterministic_model

SAMPLES = 20  # MC dropout samples of serve_mc
CONVERTED = ("onnx", "litert")
# Klambauer et al.'s SELU constants: alpha dropout sets dropped units to -scale * alpha
ALPHA_P = -1.6732632423543772848170429916717 * 1.0507009873554804934193349852946


@pytest.fixture(scope="module")
def selu_dir(tmp_path_factory):
    """The demo's kind of classifier, small: a SELU encoder, MC alpha dropout before the head, ~0.9 accurate."""
    out = tmp_path_factory.mktemp("formats")
    tk.pretrain(data="digits", task="denoising", units=(64, 32), epochs=3, batch_size=64, out=str(out / "encoder"),
                verbose=False)
    return tk.finetune(from_=str(out / "encoder"), label_fraction=1.0, head_epochs=10, epochs=3, unfreeze_top=2,
                       lr=0.03, dropout=0.3, mc_dropout=True, out=str(out / "classifier"), verbose=False).artifact


@pytest.fixture(scope="module")
def exported(selu_dir):
    tk.export(selu_dir, formats="savedmodel,onnx,litert", mc_samples=SAMPLES, verbose=False)
    return {"savedmodel": Path(selu_dir) / "serving", "onnx": Path(selu_dir) / "serving-onnx",
            "litert": Path(selu_dir) / "serving-litert"}


@pytest.fixture(scope="module")
def keras_parts(selu_dir):
    """The classifier's features (its encoder, no dropout there) and its head's weights, for numpy."""
    model = keras.saving.load_model(Path(selu_dir) / "model.keras")
    assert type(model.get_layer("head_dropout")).__name__ == "MCAlphaDropout"
    encoder = keras.Model(model.input, model.get_layer("head_dropout").input)
    kernel, bias = (w.astype("float64") for w in model.get_layer("head").get_weights())
    return model, lambda x: keras.ops.convert_to_numpy(encoder(x, training=False)).astype("float64"), kernel, bias


def softmax(logits):
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def deterministic(keras_parts, x):
    _, features, kernel, bias = keras_parts
    return softmax(features(x) @ kernel + bias)  # alpha dropout is the identity at inference


def digits(n=None):
    x = load_data("digits").x
    return x if n is None else x[:n]


@pytest.mark.parametrize("fmt", CONVERTED)
def test_serve_reloads_in_its_runtime_and_matches_the_keras_model(fmt, exported, keras_parts):
    serve = open_endpoint(exported[fmt], "serve")
    x = digits()
    for start, batch in ((0, 1), (1, 7), (100, 32)):
        got = serve(x[start:start + batch])["probabilities"]
        assert got.shape == (batch, 10) and got.dtype == np.float32
        np.testing.assert_allclose(got, deterministic(keras_parts, x[start:start + batch]), atol=1e-4)


def test_the_files_run_in_the_bare_runtimes(exported, keras_parts):
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter

    x = digits(7)
    expected = deterministic(keras_parts, x)
    session = onnxruntime.InferenceSession(str(exported["onnx"] / "serve.onnx"), providers=["CPUExecutionProvider"])
    (spec,) = session.get_inputs()
    assert (spec.name, spec.type, spec.shape[1:]) == ("inputs", "tensor(float)", [8, 8, 1])
    assert not isinstance(spec.shape[0], int)  # a free batch dimension
    np.testing.assert_allclose(session.run(["probabilities"], {"inputs": x})[0], expected, atol=1e-4)
    interpreter = Interpreter(model_path=str(exported["litert"] / "serve.tflite"))
    runner = interpreter.get_signature_runner("serve")
    details = runner.get_input_details()["inputs"]
    assert list(details["shape_signature"]) == [-1, 8, 8, 1] and details["dtype"] == np.float32
    np.testing.assert_allclose(runner(inputs=x)["probabilities"], expected, atol=1e-4)


@pytest.mark.parametrize("fmt", CONVERTED)
def test_serve_mc_is_the_documented_fixed_ensemble_of_dropout_masks(fmt, exported, keras_parts, selu_dir):
    masks = np.load(exported[fmt] / "mc_masks.npz")
    assert list(masks) == ["head_dropout"]
    keep = masks["head_dropout"]
    assert keep.shape == (SAMPLES, 32) and keep.dtype == bool
    assert abs(keep.mean() - 0.7) < 4 * np.sqrt(0.7 * 0.3 / keep.size)  # rate 0.3
    _, features, kernel, bias = keras_parts
    x = digits()[200:207]
    f = features(x)
    rate = 0.3
    a = ((1 - rate) * (1 + rate * ALPHA_P ** 2)) ** -0.5
    dropped = a * (f[None] * keep[:, None] + ALPHA_P * (1 - keep[:, None])) - a * ALPHA_P * rate
    samples = softmax(dropped @ kernel + bias)  # (S, n, classes)
    mean = samples.mean(axis=0)
    got = open_endpoint(exported[fmt], "serve_mc")(x)
    np.testing.assert_allclose(got["mean"], mean, atol=1e-4)
    np.testing.assert_allclose(got["std"], samples.std(axis=0), atol=1e-4)
    np.testing.assert_allclose(got["entropy"], -np.sum(mean * np.log(mean + 1e-12), axis=1), atol=1e-4)
    again = open_endpoint(exported[fmt], "serve_mc")(x)
    np.testing.assert_array_equal(again["mean"], got["mean"])  # fixed masks: deterministic
    record = json.loads((exported[fmt] / "export.json").read_text())
    assert record["mc"] == {"form": "fixed ensemble", "samples": SAMPLES, "seed": 0, "masks": "mc_masks.npz"}


@pytest.mark.parametrize("fmt", CONVERTED)
def test_serve_mc_mean_agrees_with_mc_predict_within_its_sampling_error(fmt, exported, selu_dir):
    model = tk.load_model(selu_dir)
    x = digits()[300:332]
    keras.utils.set_random_seed(0)
    reference = tk.mc_predict(model, x, samples=SAMPLES)
    got = open_endpoint(exported[fmt], "serve_mc")(x)
    assert np.all(got["std"].max(axis=1) > 0)
    # two independent means of SAMPLES draws each; 5 standard errors bound all 320 entries together (Bonferroni:
    # under normality each exceeds it with probability 6e-7)
    correction = SAMPLES / (SAMPLES - 1)  # the stds are over SAMPLES (ddof 0)
    error = np.sqrt((got["std"] ** 2 + reference.std ** 2) * correction / SAMPLES)
    z = np.abs(got["mean"] - reference.mean) / np.maximum(error, 1e-7)
    assert z.max() <= 5, z.max()
    assert 0.2 < np.mean(z ** 2) < 5  # the bound is not vacuous: the differences are of the sampling error's size


def test_signatures_refuse_other_shapes_and_types_without_aborting(exported):
    # in a fresh process: a runtime that aborts (PITFALLS 16) fails the test instead of the test run
    code = (
        "import json, numpy as np\n"
        "from transferkit.commands.runners import open_endpoint\n"
        "answers = {}\n"
        f"for fmt, folder in {json.dumps({k: str(v) for k, v in exported.items()})}.items():\n"
        "    for endpoint in ('serve', 'serve_mc'):\n"
        "        run = open_endpoint(folder, endpoint)\n"
        "        for x in (np.zeros((8, 8, 1), 'float32'), np.zeros((2, 9, 9, 1), 'float32'),\n"
        "                  np.zeros((2, 8, 8, 3), 'float32'), np.zeros((2, 8, 8, 1, 1), 'float32'),\n"
        "                  np.zeros((2, 8, 8, 1), 'float64')):\n"
        "            key = f'{fmt} {endpoint} {x.shape} {x.dtype}'\n"
        "            try:\n"
        "                answers[key] = 'accepted ' + str({k: v.shape for k, v in run(x).items()})\n"
        "            except Exception as err:\n"
        "                answers[key] = 'refused: ' + type(err).__name__\n"
        "print(json.dumps(answers))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    answers = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(answers) == 3 * 2 * 5
    accepted = {call: answer for call, answer in answers.items() if not answer.startswith("refused")}
    assert accepted == {}


@pytest.mark.parametrize("fmt", ("savedmodel", *CONVERTED))
def test_an_empty_batch_gives_empty_outputs_from_every_endpoint(fmt, exported):
    empty = np.zeros((0, 8, 8, 1), "float32")
    serve = open_endpoint(exported[fmt], "serve")(empty)
    assert {k: v.shape for k, v in serve.items()} == {"probabilities": (0, 10)}
    serve_mc = open_endpoint(exported[fmt], "serve_mc")(empty)
    assert {k: v.shape for k, v in serve_mc.items()} == {"mean": (0, 10), "std": (0, 10), "entropy": (0,)}


def test_the_manifest_records_each_export_and_its_check(exported, selu_dir):
    exports = json.loads((Path(selu_dir) / "manifest.json").read_text())["exports"]
    assert set(exports) == {"savedmodel", "onnx", "litert"}
    for key, record in exports.items():
        assert Path(record["path"]) == exported[key]
        assert set(record["endpoints"]) == {"serve", "serve_mc"}
        assert record["endpoints"]["serve"]["max_relative_difference"] <= export_checks.RTOL
    assert exports["onnx"]["converter"].startswith("tf2onnx 1.17")
    assert sorted(p.name for p in exported["litert"].iterdir()) == [
        "export.json", "mc_masks.npz", "serve.tflite", "serve_mc.tflite"]


@pytest.mark.parametrize("quantize", ("int8", "dynamic", "float16"))
def test_a_quantized_litert_export_keeps_the_keras_class_and_records_its_accuracy(quantize, selu_dir, keras_parts):
    result = tk.export(selu_dir, formats="litert", quantize=quantize, mc_samples=SAMPLES, verbose=False)
    folder = Path(selu_dir) / f"serving-litert-{quantize}"
    x_all, y_all = load_data("digits").x, load_data("digits").y
    test = Split.from_dict(json.loads((Path(selu_dir) / "split.json").read_text())).test
    x, y = x_all[test], y_all[test]
    serve = open_endpoint(folder, "serve")
    got = np.concatenate([serve(x[i:i + 32])["probabilities"] for i in range(0, len(x), 32)])
    expected = deterministic(keras_parts, x)
    agreement = np.mean(got.argmax(1) == expected.argmax(1))
    assert agreement >= 0.95
    record = json.loads((Path(selu_dir) / "manifest.json").read_text())["exports"][f"litert-{quantize}"]
    checked = record["endpoints"]["serve"]
    assert record["quantize"] == quantize and checked["examples"] == len(test)
    keras_accuracy = np.mean(expected.argmax(1) == y)
    assert checked["keras_accuracy"] == pytest.approx(keras_accuracy)
    # dynamic-range quantization scales activations per batch, so batches of other sizes may flip a rare class
    assert checked["accuracy"] == pytest.approx(np.mean(got.argmax(1) == y), abs=2 / len(test))
    assert checked["accuracy_drop"] == pytest.approx(checked["keras_accuracy"] - checked["accuracy"])
    assert result.metrics[f"litert_{quantize}_accuracy_drop"] == checked["accuracy_drop"]
    assert open_endpoint(folder, "serve_mc")(x[:5])["std"].max() > 0  # quantized: in steps, > 0 for some input


def test_selu_layers_are_converted_in_a_form_whose_exp_int8_can_quantize(selu_dir):
    model = tk.load_model(selu_dir)
    convertible = export_formats.quantizable(model)
    swapped = [layer for layer in convertible.get_layer("encoder").layers if isinstance(layer, keras.layers.Activation)]
    assert len(swapped) == 2 and all(layer.activation is not keras.activations.selu for layer in swapped)
    x = np.linspace(-8, 8, 1601, dtype="float32")
    np.testing.assert_allclose(keras.ops.convert_to_numpy(swapped[0](x)),
                               keras.ops.convert_to_numpy(keras.activations.selu(x)), rtol=1e-6, atol=1e-6)
    x = digits(16)
    np.testing.assert_allclose(*(keras.ops.convert_to_numpy(deterministic_model(m)(x, training=False))
                                 for m in (model, convertible)), atol=1e-6)


def test_fixed_masks_are_plain_dropout_drawn_once_from_the_seed():
    from transferkit.pieces.layers import MCDropout
    from transferkit.commands.mc_ensemble import FixedMasks, fixed_mask_model

    inputs = keras.Input((3, 4))
    model = keras.Model(inputs, MCDropout(0.25, noise_shape=(None, 1, 4), name="drop")(inputs))
    ensemble = fixed_mask_model(model, samples=5, seed=7)
    keep = np.random.default_rng([7, 0]).random((5, 1, 4)) >= 0.25  # the documented draw
    x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
    stacked = np.concatenate([x] * 5)  # sample-major: rows s*2 and s*2+1 get mask s
    expected = (x[None] * keep[:, None] / 0.75).reshape(10, 3, 4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(ensemble(stacked)), expected, rtol=1e-6)
    layer = ensemble.get_layer("drop")
    rebuilt = FixedMasks.from_config(layer.get_config())
    rebuilt.build((None, 3, 4))
    assert rebuilt.get_config() == layer.get_config()
    np.testing.assert_array_equal(rebuilt.masks, layer.masks)


def test_an_encoder_exports_its_features_to_onnx_and_litert(encoder_dir, tmp_path):
    tk.export(encoder_dir, tmp_path / "served", formats="onnx,litert", verbose=False)
    model = keras.saving.load_model(Path(encoder_dir) / "model.keras")
    x = digits(7)
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    for fmt in CONVERTED:
        got = open_endpoint(tmp_path / f"served-{fmt}", "serve")(x)["features"]
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
    assert not (tmp_path / "served").exists()  # no savedmodel asked for


def test_onnx_and_litert_on_jax_are_refused_before_any_work(selu_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-m", "transferkit.cli", "--backend", "jax", "export", str(selu_dir),
                           "--out", str(tmp_path / "out"), "--format", "savedmodel,onnx"],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "needs the TensorFlow backend" in done.stderr and not list(tmp_path.iterdir())


def test_a_format_without_its_packages_names_the_extra(selu_dir, tmp_path, monkeypatch):
    monkeypatch.setitem(export_formats._NEEDS, "onnx", ("tf2onnx", "no_such_module_here"))
    result = run_cli("export", selu_dir, "--out", tmp_path / "out", "--format", "onnx")
    assert result.exit_code == 2
    assert "pip install 'transferkit[onnx]'" in one_error_line(result) and not list(tmp_path.iterdir())


def run_cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def one_error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


@pytest.mark.parametrize("args, words", [
    (["--format", "savedmodel,tflite"], ["'tflite'", "savedmodel, onnx, litert"]),
    (["--format", "litert", "--quantize", "int4"], ["'int4'", "'dynamic', 'float16', 'int8'"]),
    (["--format", "onnx", "--quantize", "int8"], ["--quantize int8 applies to the litert format"]),
])
def test_bad_format_or_quantize_exits_2_with_one_line(args, words, selu_dir, tmp_path):
    result = run_cli("export", selu_dir, "--out", tmp_path / "out", *args)
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert all(w in line for w in words), line
    assert not list(tmp_path.iterdir())


def test_quantizing_an_encoder_is_refused(encoder_dir, tmp_path):
    result = run_cli("export", encoder_dir, "--out", tmp_path / "out", "--format", "litert", "--quantize", "dynamic")
    assert result.exit_code == 2 and "needs a classifier" in one_error_line(result)


def test_a_failed_check_of_one_format_publishes_none(selu_dir, tmp_path, monkeypatch):
    compare = export_checks.compare

    def litert_differs(run, reference, manifest, what):
        if what.startswith("LiteRT"):
            raise TransferkitError(f"The exported {what} differs from the Keras model; nothing was written.")
        return compare(run, reference, manifest, what)

    monkeypatch.setattr(export_checks, "compare", litert_differs)
    result = run_cli("export", selu_dir, "--out", tmp_path / "served", "--format", "savedmodel,onnx,litert",
                     "--mc-samples", 4)
    assert result.exit_code == 1, result.output
    assert "LiteRT 'serve' differs" in one_error_line(result)
    assert list(tmp_path.iterdir()) == []  # no SavedModel, no ONNX, no temporary folder


# --- slow: a MobileNetV2 (from weights=None, trained on the digits' training split) as a --base ---


@pytest.mark.slow
def test_mobilenetv2_exports_to_every_format_and_matches(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "bench"))
    from exports import mobilenetv2_base  # the bench's: BatchNorm statistics set by a training-mode call

    base = mobilenetv2_base(tmp_path / "mobilenetv2.keras", epochs=4)
    clf = tk.finetune(data="digits", base=str(base), preprocess="tf", label_fraction=1.0, head_epochs=5, epochs=0,
                      unfreeze_top=0, lr=0.01, dropout=0.2, mc_dropout=True, out=str(tmp_path / "clf"),
                      verbose=False).artifact
    tk.export(clf, formats="savedmodel,onnx,litert", mc_samples=4, verbose=False)
    tk.export(clf, formats="litert", quantize="int8", mc_samples=4, verbose=False)
    model = tk.load_model(clf)
    features = keras.Model(model.input, model.get_layer("head_dropout").input)
    kernel, bias = (w.astype("float64") for w in model.get_layer("head").get_weights())
    x = digits(32)
    expected = softmax(keras.ops.convert_to_numpy(features(x, training=False)).astype("float64") @ kernel + bias)
    assert len(set(expected.argmax(1))) > 1  # the features vary: not every input gets the same class
    for fmt in CONVERTED:
        folder = Path(clf) / f"serving-{fmt}"
        got = open_endpoint(folder, "serve")(x)["probabilities"]
        np.testing.assert_allclose(got, expected, atol=1e-4 * np.abs(expected).max())
        assert open_endpoint(folder, "serve_mc")(np.zeros((0, 8, 8, 1), "float32"))["mean"].shape == (0, 10)
    record = json.loads((Path(clf) / "manifest.json").read_text())["exports"]["litert-int8"]
    assert record["endpoints"]["serve"]["agreement"] >= export_checks.MIN_AGREEMENT
