"""diagnose, TrainingHealth and `transferkit diagnose`: each verdict on a net built to have its problem.

Expected figures come from an independent computation (a plain GradientTape, numpy
on the weights) or from construction (a bias of -1000 kills a ReLU), never from the
code under test.
"""

import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

import transferkit as tk

from transferkit.data.sources import Data, load_data, split_data
from transferkit.commands.diagnose import diagnose
from transferkit.errors import SettingsError
from transferkit.pieces.health import TrainingHealth

from helpers import run

DEPTH, WIDTH = 50, 64  # 64 units: with N(0, 1) weights the sigmoid net is below the edge of chaos (docs/claims.md)


@pytest.fixture(scope="module")
def digits():
    data = load_data("digits")
    x = data.x.reshape(len(data.x), -1)
    return ((x - x.mean(0)) / (x.std(0) + 1e-7)).astype("float32"), data.y


def fixed_batches(x, y, batches=4, size=32):
    return tf.data.Dataset.from_tensor_slices((x[: batches * size], y[: batches * size])).batch(size)


def deep_net(activation, initializer, depth=DEPTH, width=WIDTH, seed=0):
    keras.utils.set_random_seed(seed)
    layers = [keras.layers.Dense(width, activation=activation, kernel_initializer=initializer(i), name=f"dense_{i}")
              for i in range(depth)]
    return keras.Sequential([keras.Input((64,)), *layers, keras.layers.Dense(10, activation="softmax", name="head")])


def tape_grad_norms(model, dataset):
    """Per-layer gradient norms (kernel and bias), mean over the batches, with a plain GradientTape."""
    totals = np.zeros(len(model.layers))
    batches = 0
    for x, y in dataset:
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y, model(x, training=True)))
        grads = tape.gradient(loss, [layer.weights for layer in model.layers])
        totals += [np.sqrt(sum(float(np.sum(np.square(g))) for g in gs)) for gs in grads]
        batches += 1
    return totals / batches


def weight_norms(model):
    return np.array([np.sqrt(sum(float(np.sum(np.square(w))) for w in layer.get_weights())) for layer in model.layers])


def test_a_zero_head_before_its_first_step_is_not_taken_for_vanishing_gradients(digits):
    # a healthy ReLU net (He init) under a head that starts at zero: every layer below reads a gradient of 0
    model = deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i), depth=4)
    model.get_layer("head").set_weights([np.zeros((WIDTH, 10), "float32"), np.zeros(10, "float32")])
    data = fixed_batches(*digits)
    assert tape_grad_norms(model, data)[0] == 0.0  # the tape agrees: nothing reaches the first layer
    assert diagnose(model, data).verdict("vanishing_gradients") is None
    # one SGD step later the head has weights and the same net's gradients flow: still nothing to flag
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.fit(data, epochs=1, verbose=0, shuffle=False)  # the fixed batches, in order
    report = diagnose(model, data)
    assert report.layers[0].grad_norm > 0 and report.verdict("vanishing_gradients") is None


def test_vanishing_gradients_flagged_on_deep_sigmoid_net_with_standard_normal_weights(digits):
    model = deep_net("sigmoid", lambda i: keras.initializers.RandomNormal(0.0, 1.0, seed=i))
    data = fixed_batches(*digits)
    report = diagnose(model, data)
    expected = tape_grad_norms(model, data)
    got = np.array([row.grad_norm for row in report.layers])
    np.testing.assert_allclose(got, expected, rtol=1e-4)
    np.testing.assert_allclose(report.layers[0].grad_to_top, expected[0] / expected[-1], rtol=1e-4)
    vanishing = report.verdict("vanishing_gradients")
    assert vanishing is not None
    assert set(vanishing.layers) == {f"dense_{i}" for i in range(DEPTH) if expected[i] / expected[-1] < 1e-2}
    assert "dense_0" in vanishing.layers and "head" not in vanishing.layers
    assert vanishing.remedies[:2] == ("initializer", "activation")
    assert report.verdict("saturation") is not None
    text = report.format()
    assert "vanishing gradients" in text and "--activation relu" in text and "< 0.01 x the top layer's" in text


def test_he_relu_net_gets_a_clean_bill(digits):
    report = diagnose(deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i)), fixed_batches(*digits))
    assert report.healthy, report.format()
    assert "verdicts: none" in report.format()


def test_dead_units_flagged_when_biases_are_very_negative(digits):
    model = deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i), depth=3, width=16)
    kernel, bias = model.get_layer("dense_1").get_weights()
    model.get_layer("dense_1").set_weights([kernel, np.full_like(bias, -1000.0)])
    x, y = digits[0][:128], digits[1][:128]
    # numpy: dense_0's units that are zero for all 128 examples; dense_1 (-1000 bias) and dense_2 (zero input,
    # zero bias) output zero everywhere by construction
    k0, b0 = model.get_layer("dense_0").get_weights()
    dead_0 = float(np.mean(np.all(x @ k0 + b0 <= 0, axis=0)))
    report = diagnose(model, fixed_batches(x, y))
    assert report.layer("dense_0").dead == pytest.approx(dead_0)
    assert report.layer("dense_1").dead == 1.0 and report.layer("dense_2").dead == 1.0
    assert report.verdict("dead_units").layers == ("dense_1", "dense_2")
    assert report.verdict("dead_units").remedies[1] == "leaky"


def test_exploding_gradients_flagged_on_huge_weights(digits):
    model = deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i), depth=10, width=32)
    for layer in model.layers[:-1]:
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 10.0, bias])
    data = fixed_batches(*digits)
    report = diagnose(model, data)
    grads, weights = tape_grad_norms(model, data), weight_norms(model)
    expected = {layer.name for layer, g, w in zip(model.layers, grads, weights) if g / w > 100 or g / grads[-1] > 100}
    assert {f"dense_{i}" for i in range(10)} <= expected  # the construction does explode
    assert set(report.verdict("exploding_gradients").layers) == expected
    assert "--clipnorm" in report.format()


def test_non_finite_gradients_are_exploding(digits):
    model = deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i), depth=10, width=32)
    for layer in model.layers[:-1]:
        kernel, bias = layer.get_weights()
        layer.set_weights([kernel * 1e6, bias])
    report = diagnose(model, fixed_batches(*digits), batches=1)
    assert "non-finite" in report.verdict("exploding_gradients").detail


@pytest.mark.backend_neutral
def test_activation_figures_match_numpy():
    x = np.linspace(-8, 8, 96, dtype="float32").reshape(-1, 1)
    model = keras.Sequential([keras.Input((1,)), keras.layers.Dense(2, activation="sigmoid", name="squash"),
                              keras.layers.Dense(1, name="out")])
    model.get_layer("squash").set_weights([np.array([[1.0, 0.25]], "float32"), np.array([0.0, 1.0], "float32")])
    report = diagnose(model, (x, None), batches=3, batch_size=32)
    s = 1 / (1 + np.exp(-(x @ np.array([[1.0, 0.25]]) + np.array([0.0, 1.0]))))
    row = report.layer("squash")
    assert row.activation == "sigmoid" and row.units == 2
    assert row.mean == pytest.approx(s.mean(), abs=1e-6) and row.std == pytest.approx(s.std(), abs=1e-6)
    assert row.saturated == pytest.approx(np.mean((s < 0.01) | (s > 0.99)))
    assert row.percentiles[3] == pytest.approx(np.median(s), abs=1e-6)
    assert report.loss == "random projection"


def test_broken_self_normalization_flagged_on_unstandardized_inputs(digits):
    def selu_net():
        return deep_net("selu", lambda i: keras.initializers.LecunNormal(seed=i), depth=8, width=64)

    standardized = diagnose(selu_net(), fixed_batches(*digits))
    raw = load_data("digits").x.reshape(-1, 64)  # pixels 0..16, mean about 5
    drifted = diagnose(selu_net(), fixed_batches(raw, digits[1]))
    assert standardized.verdict("self_normalization") is None
    assert "dense_0" in drifted.verdict("self_normalization").layers


def test_diagnose_leaves_batchnorm_statistics_and_weights_untouched(digits):
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, name="hidden"),
                              keras.layers.BatchNormalization(name="bn"), keras.layers.Activation("relu"),
                              keras.layers.Dropout(0.5), keras.layers.Dense(10, activation="softmax")])
    before = [v.numpy().copy() for v in model.variables]
    report = diagnose(model, digits)
    assert report.layer("hidden").activation == "relu"  # the activation after BatchNorm is the one measured
    for old, new in zip(before, model.variables):
        np.testing.assert_array_equal(old, new.numpy())


def test_bad_settings_raise_settings_error(tmp_path, digits):
    model = deep_net("relu", lambda i: "he_normal", depth=1, width=4)
    with pytest.raises(SettingsError, match="batches must be an integer >= 1"):
        diagnose(model, digits, batches=0)
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SettingsError, match="neither a transferkit artifact folder nor a .keras file"):
        diagnose(tmp_path / "notes.txt")
    model.save(tmp_path / "m.keras")
    with pytest.raises(SettingsError, match="needs? .*--data|pass the data"):
        diagnose(tmp_path / "m.keras")
    with pytest.raises(SettingsError, match="shape"):
        diagnose(model, (np.zeros((8, 3), "float32"), None))
    with pytest.raises(SettingsError, match="every must be"):
        TrainingHealth(digits, every=0)


class Counting(keras.layers.Layer):
    """Identity that counts its eager forward and backward passes."""

    forward = backward = 0

    def call(self, x):
        if tf.executing_eagerly():
            Counting.forward += 1

        @tf.custom_gradient
        def identity(t):
            def grad(dy):
                Counting.backward += 1
                return dy
            return tf.identity(t), grad

        return identity(x)


def test_callback_adds_one_forward_backward_pass_every_n_steps(digits):
    x, y = digits[0][:160], digits[1][:160]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(16, activation="relu"), Counting(),
                              keras.layers.Dense(10, activation="softmax")])
    model.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True)
    health = TrainingHealth((x, y), every=7, batch_size=16)
    Counting.forward = Counting.backward = 0
    history = model.fit(x, y, batch_size=16, epochs=2, callbacks=[health], verbose=0)
    steps = 2 * 160 // 16
    checks = -(-steps // 7)  # before steps 0, 7 and 14
    assert Counting.forward == steps + checks and Counting.backward == steps + checks
    assert [step for step, _ in health.reports] == [0, 7, 14]
    assert len(history.history["health_max_grad_to_weight"]) == 2
    assert history.history["health_verdicts"] == [0.0, 0.0]


@pytest.mark.backend_neutral
def test_finetune_checks_training_health_on_every_backend(encoder_dir, tmp_path):
    # JAX's fit keeps the weights outside the variables mid-epoch: a check must put them back first
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.1, head_epochs=1, epochs=1, health_every=2,
                         out=str(tmp_path / "clf"), verbose=False)
    ratios = result.history["health_max_grad_to_top"]
    assert len(ratios) == 2 and all(np.isfinite(ratios)) and max(ratios) > 0


def test_callback_warns_once_per_verdict_and_writes_tensorboard(digits, tmp_path):
    x, y = digits[0][:128], digits[1][:128]
    model = deep_net("relu", lambda i: keras.initializers.HeNormal(seed=i), depth=3, width=16)
    kernel, bias = model.get_layer("dense_1").get_weights()
    model.get_layer("dense_1").set_weights([kernel, np.full_like(bias, -1000.0)])
    model.compile("sgd", "sparse_categorical_crossentropy")
    health = TrainingHealth((x, y), every=2, log_dir=tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=32, epochs=2, callbacks=[health], verbose=0)
    messages = [str(w.message) for w in caught if "TrainingHealth" in str(w.message)]
    assert len(health.reports) == 4
    assert sum("dead units" in m for m in messages) == 1
    assert len(messages) == len({v.kind for _, r in health.reports for v in r.verdicts})
    tags = set()
    for event_file in (tmp_path / "health").iterdir():
        for record in tf.data.TFRecordDataset(str(event_file)):
            event = tf.compat.v1.Event.FromString(record.numpy())
            tags.update(value.tag for value in event.summary.value)
    assert {"dead/dense_1", "grad_to_top/dense_0", "summary/max_dead", "verdicts"} <= tags


@pytest.fixture(scope="module")
def keras_file_and_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("diagnose")
    model = deep_net("sigmoid", lambda i: keras.initializers.RandomNormal(0.0, 1.0, seed=i), depth=20, width=16)
    model.save(folder / "sigmoid.keras")
    data = load_data("digits")
    np.savez(folder / "digits.npz", x=data.x.reshape(-1, 64), y=data.y)
    return folder / "sigmoid.keras", f"npz:{folder / 'digits.npz'}"


def test_cli_diagnoses_a_keras_file_and_plots_a_png(keras_file_and_data, tmp_path):
    model, spec = keras_file_and_data
    result = run("diagnose", model, "--data", spec, "--batches", "2", "--plot", tmp_path / "plots" / "health.png")
    assert result.exit_code == 0, result.output
    assert "vanishing gradients" in result.output and "thresholds:" in result.output
    png = (tmp_path / "plots" / "health.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    assert not list((tmp_path / "plots").glob(".*tmp"))


@pytest.mark.parametrize("args, message", [
    (["notes.txt"], "neither a transferkit artifact folder nor a .keras file"),
    (["MODEL", "--batches", "0"], "batches must be an integer >= 1"),
    (["MODEL"], "pass the data"),
])
def test_cli_bad_input_exits_2_with_one_line(keras_file_and_data, tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("hi")
    model, spec = keras_file_and_data
    args = [str(model) if a == "MODEL" else str(tmp_path / a) if a == "notes.txt" else a for a in args]
    result = run("diagnose", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output and len(result.output.strip().splitlines()) == 1


def test_cli_diagnoses_an_artifact_on_its_training_split_only(tmp_path):
    """Test-split inputs are 1e6: one of them in a batch would blow the first layer's std past 1e3."""
    digits = load_data("digits")
    test = split_data(Data(digits.x, digits.y, "digits", None, (0.0, 16.0)), seed=0).test
    x = digits.x.copy()
    x[test] = 1e6
    np.savez(tmp_path / "poisoned.npz", x=x, y=digits.y)
    out = tmp_path / "encoder"
    result = run("pretrain", "--data", f"npz:{tmp_path / 'poisoned.npz'}", "--seed", "0", "--epochs", "1",
                 "--units", "8,4", "--out", out)
    assert result.exit_code == 0, result.output
    result = run("diagnose", out, "--batches", "8")
    assert result.exit_code == 0, result.output
    assert "training split of npz:" in result.output and "random projection" in result.output
    clean = diagnose(out, batches=8)
    assert max(row.std for row in clean.layers) < 100
    with_test = diagnose(out, (x, None), batches=8)  # the same model on every example does see the poison
    assert with_test.layers[0].std > 1e3


def test_the_command_line_imports_no_tensorflow():
    code = ("import sys; import transferkit.cli; "
            "print(sorted(m for m in ('tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    assert run("diagnose", "--help").exit_code == 0
