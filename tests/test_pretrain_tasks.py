"""Every pretraining task: it learns, saves an encoder `finetune --from` takes, and draws its pictures."""

import json

import keras
import numpy as np
import pytest
from click.testing import CliRunner

import transferkit as tk
from transferkit.cli import cli
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe
from helpers import assert_config_round_trip, assert_reloads_with_same_outputs

TASKS = ["autoencoder", "denoising", "stacked", "rotation", "pairs", "gan"]
PICTURES = {"autoencoder": "reconstructions.png", "denoising": "reconstructions.png",
            "stacked": "reconstructions.png", "rotation": "predictions.png", "pairs": "pairs.png",
            "gan": "samples.png"}
TINY = dict(epochs=4, batch_size=32, units=(32, 16), filters=(8, 8), val_fraction=0.1, verbose=False)


@pytest.fixture(scope="module")
def slice_spec(tmp_path_factory):
    """The first 300 digits with their labels, as an npz data spec."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    path = tmp_path_factory.mktemp("data") / "slice.npz"
    np.savez(path, x=digits.images[:300].astype("float32"), y=digits.target[:300])
    return f"npz:{path}"


def primary_loss(history):
    return history["d_loss"] if "d_loss" in history else history["loss"]


# gan has its own train step per backend
@pytest.mark.parametrize("task,arch", [pytest.param(t, "dense", marks=[pytest.mark.backend_neutral] if t == "gan" else [])
                                       for t in TASKS] + [("denoising", "conv"), ("pairs", "conv")])
def test_task_lowers_its_loss_saves_an_encoder_and_fine_tunes_from_the_cli(task, arch, slice_spec, tmp_path):
    settings = {"noise_kind": "dropout"} if (task, arch) == ("denoising", "dense") else {}
    enc = tk.pretrain(data=slice_spec, task=task, arch=arch, seed=1, out=str(tmp_path / "enc"), **settings, **TINY)
    loss = primary_loss(enc.history)
    if task == "stacked":  # each block's own curve
        blocks = np.asarray(enc.history["block"])
        loss = [v for v, b in zip(loss, blocks) if b == blocks[-1]]
    assert loss[-1] < loss[0], enc.history
    manifest = json.loads((tmp_path / "enc" / "manifest.json").read_text())
    assert manifest["kind"] == "encoder" and manifest["task"] == task
    for picture in (PICTURES[task], "loss.png"):
        assert (tmp_path / "enc" / picture).read_bytes()[:4] == b"\x89PNG"
        assert picture in manifest["pictures"]

    result = CliRunner().invoke(cli, ["finetune", "--from", str(tmp_path / "enc"), "--data", slice_spec,
                                      "--label-fraction", "0.2", "--head-epochs", "2", "--epochs", "1",
                                      "--unfreeze-top", "1", "--out", str(tmp_path / "clf")], obj={})
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "clf" / "manifest.json").read_text())["metrics"]["test_accuracy"] > 0


def test_tied_weights_share_one_kernel_variable():
    from transferkit.pretraining.train import build_autoencoder, build_decoder, build_encoder
    from transferkit.pieces.tied import DenseTranspose

    recipe = Recipe(units=(16, 8), tied_weights=True)
    x = np.random.default_rng(0).normal(size=(64, 12)).astype("float32")
    encoder = build_encoder((12,), recipe, x)
    autoencoder = build_autoencoder(encoder, build_decoder(encoder, (12,), recipe))
    tied = [layer for layer in autoencoder.get_layer("decoder").layers if isinstance(layer, DenseTranspose)]
    denses = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Dense)]
    assert [t.dense for t in tied] == denses[::-1]
    kernels = [v for v in autoencoder.trainable_variables if v.path.endswith("kernel")]
    assert len(kernels) == len(denses) == 2  # the decoder has no kernel of its own
    autoencoder.compile(optimizer="adam", loss="mse")
    before = denses[0].kernel.numpy().copy()
    autoencoder.fit(x, x, epochs=2, verbose=0)
    assert not np.allclose(before, denses[0].kernel.numpy())
    assert tied[-1].dense.kernel is denses[0].kernel


def test_dense_transpose_round_trips_its_config_and_reloads_tied(tmp_path):
    from transferkit.pieces.tied import DenseTranspose

    inputs = keras.Input((6,))
    dense = keras.layers.Dense(3, activation="selu", name="dense")
    layer = DenseTranspose(dense, activation="sigmoid", name="tied")
    model = keras.Model(inputs, layer(dense(inputs)))
    assert_config_round_trip(layer)
    reloaded = assert_reloads_with_same_outputs(model, np.random.default_rng(1).random((4, 6), "float32"), tmp_path)
    assert reloaded.get_layer("tied").dense is reloaded.get_layer("dense")


def test_pair_scores_round_trip_its_config(tmp_path):
    from transferkit.pretraining.pretext import PairScores

    a, b = keras.Input((4,)), keras.Input((4,))
    layer = PairScores(5.0)
    model = keras.Model([a, b], layer([a, b]))
    assert_config_round_trip(layer)
    x = np.random.default_rng(2).normal(size=(2, 3, 4)).astype("float32")
    assert_reloads_with_same_outputs(model, [x[0], x[1]], tmp_path)


def test_greedy_stacking_trains_one_block_at_a_time(slice_spec):
    from transferkit.training import runs
    from transferkit.pretraining.train import Job, build_encoder, encoder_blocks, train_stacked

    recipe = Recipe(data=slice_spec, task="stacked", units=(16, 8, 4), epochs=2, batch_size=32, lr=1e-3)
    data, split = runs.prepare(recipe)
    encoder = build_encoder(data.input_shape, recipe, data.x[split.train])
    blocks = encoder_blocks(encoder)

    def weights():
        return [[w.numpy().copy() for layer in layers for w in layer.weights] for _, layers in blocks]

    snapshots = [weights()]
    job = Job(recipe, data, split, encoder, verbose=False)
    train_stacked(job, on_layer_trained=lambda i: snapshots.append(weights()))
    assert len(snapshots) == len(blocks) + 1
    for i in range(len(blocks)):
        before, after = snapshots[i], snapshots[i + 1]
        changed = [not all(np.array_equal(a, b) for a, b in zip(before[j], after[j])) for j in range(len(blocks))]
        assert changed == [j == i for j in range(len(blocks))], f"while block {i + 1} trained: {changed}"


def test_rotation_labels_are_right_for_a_known_image():
    from transferkit.pretraining.pretext import rotations

    image = np.array([[1, 2], [3, 4]], "float32")[None, ..., None]  # 1 2 / 3 4
    images, labels = rotations(image)
    assert labels.tolist() == [0, 1, 2, 3]
    turned = images[..., 0].tolist()
    assert turned[0] == [[1, 2], [3, 4]]
    assert turned[1] == [[2, 4], [1, 3]]  # 90 degrees counter-clockwise
    assert turned[2] == [[4, 3], [2, 1]]
    assert turned[3] == [[3, 1], [4, 2]]


def test_pairs_of_the_same_image_are_labelled_same():
    from transferkit.pretraining.pretext import pair_accuracy, same_or_different_loss, same_pairs

    ids = np.array([7.0, 2.0, 7.0, 5.0])
    labels = keras.ops.convert_to_numpy(same_pairs(ids))
    assert np.all(np.diag(labels) == 1)
    assert labels[0, 2] == labels[2, 0] == 1 and labels[0, 1] == labels[1, 3] == 0
    right = np.where(labels == 1, 9.0, -9.0).astype("float32")
    assert float(same_or_different_loss(ids, right)) < 1e-3 < float(same_or_different_loss(ids, -right))
    assert float(pair_accuracy(ids, right)) == 1.0


def test_dropout_noise_masks_without_rescaling_while_training_only():
    from transferkit.pretraining.train import corruption

    noise = keras.Sequential(corruption(0.5, "dropout", seed=3))
    x = np.full((1, 1000), 2.0, "float32")
    trained = keras.ops.convert_to_numpy(noise(x, training=True))
    assert set(np.unique(trained)) == {0.0, 2.0} and 0.4 < (trained == 0).mean() < 0.6
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(noise(x, training=False)), x)


@pytest.mark.parametrize("settings,words", [
    (dict(task="gan", batch_size=512), "--task gan trains on full batches: the training split has"),
    (dict(task="autoencoder", arch="conv", tied_weights=True), "--tied-weights ties a dense decoder"),
    (dict(task="rotation", tied_weights=True), "--tied-weights needs a decoder"),
    (dict(task="denoising", noise=0.0), "--task denoising needs --noise > 0"),
    (dict(noise_kind="salt"), "noise_kind must be one of gaussian, dropout. Received: noise_kind='salt'"),
])
def test_bad_settings_fail_before_training(settings, words, slice_spec, tmp_path):
    with pytest.raises(SettingsError, match=words.replace("(", r"\(").replace(")", r"\)")):
        tk.pretrain(data=slice_spec, out=str(tmp_path / "enc"), **{**TINY, **settings})
    assert not (tmp_path / "enc").exists()


def test_rotation_of_vectors_is_refused(tmp_path):
    np.savez(tmp_path / "v.npz", x=np.zeros((40, 5), "float32"))
    with pytest.raises(SettingsError, match="rotates square images"):
        tk.pretrain(data=f"npz:{tmp_path}/v.npz", task="rotation", out=str(tmp_path / "enc"), verbose=False)


def test_cli_gan_on_too_little_data_exits_2_with_one_line(slice_spec, tmp_path):
    result = CliRunner().invoke(cli, ["pretrain", "--data", slice_spec, "--task", "gan", "--batch-size", "1000",
                                      "--out", str(tmp_path / "enc")], obj={})
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "--task gan trains on full batches" in errors[0]
    assert not (tmp_path / "enc").exists()
