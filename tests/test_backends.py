"""TensorFlow and JAX: `--backend`, artifacts that cross from one to the other, and the same head stage on both.

Each test runs in the suite's backend (KERAS_BACKEND) and checks against the
other one, started in a fresh process: `make test` compares TensorFlow with
JAX, `make test-jax` JAX with TensorFlow.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from helpers import run

pytestmark = pytest.mark.backend_neutral

ROOT = Path(__file__).resolve().parents[1]
HERE = keras.backend.backend()
OTHER = "jax" if HERE == "tensorflow" else "tensorflow"


def on_other_backend(code: str) -> str:
    """Run `code` in a fresh Python on the other backend; its stdout's last line."""
    env = {**os.environ, "KERAS_BACKEND": OTHER, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def fixed_head_stage(encoder_dir: str, out: str) -> list:
    """One epoch of a head-only stage on cached base outputs, from one fixed head (numpy-seeded).

    One epoch: its order is the seeded shuffle's first on both backends. TensorFlow's `fit` takes later
    reshuffles in another sequence than a Python loop over the dataset (JAX's `fit`) does.
    """
    import transferkit as tk
    from transferkit.finetuning import plan as finetuning

    build = finetuning.build_classifier

    def with_fixed_head(*args):
        clf = build(*args)
        head = clf.head.get_layer("head")
        rng = np.random.default_rng(0)
        head.set_weights([rng.normal(0, 0.1, head.kernel.shape).astype("float32"), np.zeros(head.bias.shape, "float32")])
        return clf

    finetuning.build_classifier = with_fixed_head
    try:
        result = tk.finetune(from_=encoder_dir, label_fraction=0.2, head_epochs=1, epochs=0, unfreeze_top=0, lr=0.01,
                             dropout=0.0, cache_features=True, out=out, verbose=False)
    finally:
        finetuning.build_classifier = build
    assert "caching_seconds" in result.manifest["stages"][0]
    return [keras.ops.convert_to_numpy(w).tolist() for w in result.model.get_layer("head").weights]


def test_a_head_stage_gives_the_same_head_on_both_backends(encoder_dir, tmp_path):
    # the data order is tf.data's on both; the head starts from the same numpy weights. On JAX, without
    # `backend.build_compiled`, fit would take the shuffle's second order to build its loss and metrics
    here = fixed_head_stage(str(encoder_dir), str(tmp_path / "here"))
    there = json.loads(on_other_backend(
        "import json; from test_backends import fixed_head_stage; "
        f"print(json.dumps(fixed_head_stage({str(encoder_dir)!r}, {str(tmp_path / 'there')!r})))"))
    start = np.random.default_rng(0).normal(0, 0.1, np.shape(here[0]))
    assert np.max(np.abs(np.asarray(here[0]) - start)) > 1e-3  # it trained
    for a, b in zip(here, there):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_an_artifact_evaluates_on_the_other_backend_as_on_its_own(classifier_dir):
    manifest = json.loads((Path(classifier_dir) / "manifest.json").read_text())
    assert manifest["versions"]["backend"] == HERE
    line = on_other_backend(
        "from click.testing import CliRunner; from transferkit.cli import cli; "
        f"r = CliRunner().invoke(cli, ['--backend', {OTHER!r}, 'evaluate', {str(classifier_dir)!r}], obj={{}}); "
        "import keras; print(r.exit_code, keras.backend.backend(), "
        "next(l for l in r.output.splitlines() if l.startswith('accuracy')).split()[1])")
    code, backend, accuracy = line.split()
    assert (code, backend) == ("0", OTHER)
    test_size = manifest["split"]["sizes"]["test"]
    assert abs(float(accuracy) - manifest["metrics"]["test_accuracy"]) <= 1 / test_size + 1e-4


def test_backend_option_sets_keras_backend_before_keras_starts():
    code = ("import os, sys; from click.testing import CliRunner; from transferkit.cli import cli; "
            f"r = CliRunner().invoke(cli, ['--backend', {OTHER!r}, 'inspect', '/nonexistent'], obj={{}}); "
            "import keras; print(os.environ['KERAS_BACKEND'], keras.backend.backend())")
    env = {**os.environ, "KERAS_BACKEND": HERE}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.stdout.strip().splitlines()[-1] == f"{OTHER} {OTHER}", done.stderr[-2000:]


def test_backend_option_once_keras_runs_on_another_is_one_line_exit_2():
    result = run("--backend", OTHER, "inspect", "/nonexistent")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: Keras already runs on {HERE} in this process; set KERAS_BACKEND={OTHER} before it is imported. "
        f"Received: backend={OTHER!r}"]


def export_with_dropout(classifier: str, out: str) -> list:
    """Export `classifier` (dropout before its head) to `out`; `serve` on 4 digits and two `serve_mc` means."""
    import tensorflow as tf

    import transferkit as tk
    from transferkit.data.sources import load_data

    signatures = tf.saved_model.load(str(tk.export(classifier, out, mc_samples=10, verbose=False).artifact)).signatures
    x = tf.constant(load_data("digits").x[:4])
    return [signatures["serve"](inputs=x)["probabilities"].numpy().tolist()] + [
        signatures["serve_mc"](inputs=x)["mean"].numpy().tolist() for _ in range(2)]


def test_a_classifier_with_dropout_exports_on_both_backends(dropout_classifier_dir, tmp_path):
    # #18: on JAX, tracking the MC model after adding 'serve' gave jax2tf more variables than shapes (a pytree
    # error at write_out). Both SavedModels hold the same weights: the same 'serve'; 'serve_mc' varies per call
    here = export_with_dropout(str(dropout_classifier_dir), str(tmp_path / "here"))
    there = json.loads(on_other_backend(
        "import json; from test_backends import export_with_dropout; "
        f"print(json.dumps(export_with_dropout({str(dropout_classifier_dir)!r}, {str(tmp_path / 'there')!r})))"))
    np.testing.assert_allclose(here[0], there[0], rtol=1e-4, atol=1e-6)
    for _, first_mc, second_mc in (here, there):
        assert np.max(np.abs(np.subtract(first_mc, second_mc))) > 1e-3


def test_count_nonfinite_counts_nan_and_infinity_in_every_tensor():
    from transferkit.pieces.callbacks import count_nonfinite

    values = [np.array([1.0, np.nan, np.inf], "float32"), np.full((2, 2), -np.inf, "float32"), np.arange(3)]
    tensors = [keras.Variable(values[0]), *(keras.ops.convert_to_tensor(v) for v in values[1:])]
    assert count_nonfinite(tensors) == 2 + 4 + 0
    assert count_nonfinite(tensors[2:]) == 0
    big, half = np.finfo("float32").max, np.finfo("float16").max
    overflowing = [keras.Variable(np.array([big, big], "float32")), np.array([-half, -half, 0.5], "float16"),
                   np.array([-big, -big], "float32")]
    assert count_nonfinite(overflowing) == 0  # finite entries whose sum is not
    assert count_nonfinite(iter(tensors)) == 6 and count_nonfinite([]) == 0


def test_a_stage_compiles_its_step_on_jax_and_with_xla_on_tensorflow_only_when_asked():
    # on JAX, jit_compile=False would run every op of every step eagerly, several times slower (bench/backends.py)
    from transferkit.training import runner
    from transferkit.recipe import Recipe

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    for asked in (False, True):
        runner.compile_stage(model, Recipe(jit_compile=asked), 1e-3, 10, "mse")
        model.fit(np.ones((4, 3), "float32"), np.ones((4, 2), "float32"), epochs=1, verbose=0)
        assert model.jit_compile is (asked or HERE == "jax")
