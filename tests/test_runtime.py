"""Devices, strategies, precision, repeatability, NaN stops, damaged artifacts, more bad input."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import transferkit as tk
from transferkit.errors import TransferkitError
from transferkit.training.runtime import is_chief
from tests.test_cli import run

ROOT = Path(__file__).resolve().parents[1]


def weights_of(model):
    return [keras.ops.convert_to_numpy(w) for w in model.weights]


def test_mirrored_over_two_cpus_gives_the_weights_of_one_device_with_the_same_global_batch(encoder_dir, tmp_path):
    # Full-batch steps: tf.distribute iterates a reshuffled dataset in another order than one device does,
    # so only with one batch per epoch are the two runs the same computation.
    script = textwrap.dedent(f"""
        import numpy as np, tensorflow as tf
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import transferkit as tk
        common = dict(from_={str(encoder_dir)!r}, head_epochs=2, epochs=1, unfreeze_top=3, lr=0.01,
                      label_fraction=0.1, cache_features=False, dropout=0.0, verbose=False)
        one = tk.finetune(batch_size=126, strategy="default", out={str(tmp_path / "one")!r}, **common)
        two = tk.finetune(batch_size=63, strategy="mirrored", out={str(tmp_path / "two")!r}, **common)
        start = tk.finetune(batch_size=126, **{{**common, "head_epochs": 0, "epochs": 0, "out": {str(tmp_path / "s")!r}}})
        pairs = list(zip(one.model.weights, two.model.weights, start.model.weights))
        print("labeled", one.manifest["split"]["sizes"]["labeled"])
        print("diff", max(float(np.abs(a.numpy() - b.numpy()).max()) for a, b, _ in pairs))
        print("moved", max(float(np.abs(a.numpy() - s.numpy()).max()) for a, _, s in pairs))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = dict(line.split() for line in out.stdout.splitlines() if line.split()[0] in ("labeled", "diff", "moved"))
    assert int(figures["labeled"]) == 126
    assert float(figures["moved"]) > 1e-3  # training changed the weights...
    assert float(figures["diff"]) < 1e-5   # ...the same way on two replicas as on one


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorFlow's refusal")
@pytest.mark.parametrize("tf_config", [None, {"cluster": {"worker": ["127.0.0.1:1", "127.0.0.1:2"]},
                                              "task": {"type": "worker", "index": 0}}], ids=["unset", "two-workers"])
def test_multiworker_on_tensorflow_is_refused_in_one_line_naming_the_jax_way(tf_config, encoder_dir, tmp_path,
                                                                            monkeypatch):
    # Keras 3 (3.15, and 3.16 still) breaks in fit under MultiWorkerMirroredStrategy (keras-team/keras#20585):
    # two real workers on 127.0.0.1 end in a PerReplica conversion error deep inside Keras, whatever the version
    if tf_config is None:
        monkeypatch.delenv("TF_CONFIG", raising=False)
    else:
        monkeypatch.setenv("TF_CONFIG", json.dumps(tf_config))
    result = run("finetune", "--from", encoder_dir, "--strategy", "multiworker", "--out", tmp_path / "c")
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert "keras-team/keras#20585" in line and "--backend jax with keras.distribution" in line
    assert line.endswith("Received: strategy='multiworker'")
    assert not (tmp_path / "c").exists()


def test_is_chief_reads_tf_config(monkeypatch):
    monkeypatch.delenv("TF_CONFIG", raising=False)
    assert is_chief()
    for task, chief in [({"type": "worker", "index": 0}, True), ({"type": "worker", "index": 1}, False),
                        ({"type": "chief", "index": 0}, True)]:
        monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["a", "b"]}, "task": task}))
        assert is_chief() is chief


def test_mixed_precision_keeps_the_head_output_in_float32(encoder_dir, tmp_path):
    result = tk.finetune(from_=str(encoder_dir), precision="mixed_float16", head_epochs=1, epochs=1,
                         unfreeze_top=1, label_fraction=0.1, out=str(tmp_path / "c"), verbose=False)
    head = result.model.get_layer("head")
    assert head.dtype_policy.compute_dtype == "float32"
    base_dense = result.model.get_layer("encoder").get_layer("encoder_block1_dense")
    assert base_dense.dtype_policy.name == "mixed_float16"
    assert result.model.output.dtype == "float32"
    assert keras.mixed_precision.global_policy().name == "float32"  # restored afterwards


def test_the_same_seed_gives_identical_weights(encoder_dir, tmp_path):
    runs = [tk.finetune(from_=str(encoder_dir), seed=3, head_epochs=2, epochs=1, unfreeze_top=2, dropout=0.2,
                        label_fraction=0.2, out=str(tmp_path / f"c{i}"), verbose=False) for i in range(2)]
    for a, b in zip(weights_of(runs[0].model), weights_of(runs[1].model)):
        np.testing.assert_array_equal(a, b)


def test_a_nan_loss_stops_with_stage_epoch_and_step(encoder_dir, tmp_path):
    with pytest.raises(TransferkitError, match=r"Training diverged in stage head, epoch 1, step \d+ at learning rate "
                                               r"1e\+38: the loss became (nan|inf); lower"):
        tk.finetune(from_=str(encoder_dir), optimizer="sgd", lr=1e38, schedule="constant", head_epochs=2,
                    epochs=0, label_fraction=0.5, out=str(tmp_path / "c"), verbose=False)
    assert not (tmp_path / "c").exists()


def test_a_damaged_artifact_names_its_file(classifier_dir, tmp_path):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(classifier_dir, damaged)
    model = damaged / "model.keras"
    model.write_bytes(model.read_bytes()[:1000])
    result = run("evaluate", damaged)
    assert result.exit_code == 1
    assert f"'{model}' could not be loaded" in result.output and "Traceback" not in result.output


def test_bad_data_values_are_refused_before_training(tmp_path, encoder_dir):
    x = np.zeros((30, 8, 8, 1), "float32")
    x[3, 0, 0, 0] = np.nan
    x[4, 1, 1, 0] = np.inf
    np.savez(tmp_path / "nan.npz", x=x, y=np.arange(30) % 3)
    np.savez(tmp_path / "negative.npz", x=np.zeros((30, 8, 8, 1), "float32"), y=np.arange(30) % 3 - 1)
    for spec, words in [(f"npz:{tmp_path}/nan.npz", "has 2 NaN or infinite input values"),
                        (f"npz:{tmp_path}/negative.npz", "has label -1")]:
        result = run("finetune", "--from", encoder_dir, "--data", spec, "--out", tmp_path / "out")
        assert result.exit_code == 2 and words in result.output, result.output
    assert not (tmp_path / "out").exists()


def test_images_of_mixed_sizes_take_the_median_size(tmp_path):
    for i, size in enumerate([(8, 8), (10, 12)]):
        Image.fromarray(np.zeros(size[::-1], np.uint8), mode="L").save(tmp_path / f"{i}.png")
    assert tk.load_data(f"dir:{tmp_path}", verbose=False).input_shape == (8, 8, 1)  # the lower median of each side
    assert tk.load_data(f"dir:{tmp_path}", image_size=6, verbose=False).input_shape == (6, 6, 1)


def test_tfds_without_local_data_or_network_fails_at_once(monkeypatch, tmp_path):
    import time

    def no_network(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    started = time.perf_counter()
    result = run("pretrain", "--data", "tfds:mnist", "--out", tmp_path / "out")
    assert time.perf_counter() - started < 30
    assert result.exit_code == 1 and "is not prepared in" in result.output and "no network" in result.output


def test_an_unwritable_out_is_refused_before_training(tmp_path, encoder_dir):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    result = run("finetune", "--from", encoder_dir, "--out", blocker / "clf")
    assert result.exit_code == 2 and "cannot be written" in result.output
