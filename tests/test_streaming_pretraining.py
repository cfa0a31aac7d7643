"""Every pretraining task and `--propagate-on inputs` stream an image folder: batches built in tf.data, never the
whole split decoded into one array."""

import json

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.data.sources import load_data

from helpers import digit_images, photos

FAST = dict(units=(8,), filters=(4,), lr=1e-3, batch_size=16, image_size=12, epochs=1, verbose=False)
PICTURES = {"rotation": "predictions.png", "pairs": "pairs.png", "gan": "samples.png",
            "stacked": "reconstructions.png"}


@pytest.fixture
def fits(monkeypatch):
    """What every `fit` of the run trained on."""
    seen = []
    original = keras.Model.fit

    def recorded(self, x=None, *args, **kwargs):
        seen.append(x)
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", recorded)
    return seen


@pytest.mark.parametrize("task, arch", [("rotation", "conv"), ("pairs", "conv"), ("gan", "conv"),
                                        ("stacked", "conv"), ("stacked", "dense")])
def test_a_pretraining_task_streams_an_image_folder(task, arch, tmp_path, no_whole_decoding, fits):
    import tensorflow as tf

    spec = f"dir:{photos(tmp_path / 'photos')}"
    blocks = dict(units=(8, 4), filters=(4, 4)) if task == "stacked" else {}  # stacked: a block on the one below
    result = tk.pretrain(data=spec, task=task, arch=arch, out=str(tmp_path / "enc"), **{**FAST, **blocks})
    assert len(fits) == len(result.manifest["stages"]) and all(isinstance(x, tf.data.Dataset) for x in fits)
    losses = [v for k, v in result.history.items() if "loss" in k]
    assert losses and np.isfinite(np.concatenate(losses)).all()
    assert (result.artifact / "model.keras").exists()
    assert (result.artifact / PICTURES[task]).exists()
    assert max(no_whole_decoding) <= 8  # a picture's samples


def test_rotation_turns_in_the_pipeline_what_rotations_turns_in_memory():
    from transferkit.pretraining.job import epoch_batches
    from transferkit.pretraining.pretext import rotated, rotations

    x = digit_images(5)
    images, labels = rotations(x)  # np.rot90 of each image, 4 per image
    streamed = [(bx.numpy(), by.numpy()) for bx, by in rotated(x).in_order(7)]
    np.testing.assert_array_equal(np.concatenate([b for b, _ in streamed]), images)
    np.testing.assert_array_equal(np.concatenate([b for _, b in streamed]), labels)
    shuffled = [(bx.numpy(), by.numpy()) for bx, by in epoch_batches(rotated(x), 7, 0, range(2))]
    in_memory = [(bx.numpy(), by.numpy()) for bx, by in epoch_batches((images, labels), 7, 0, range(2))]
    for (sx, sy), (mx, my) in zip(shuffled, in_memory, strict=True):
        np.testing.assert_array_equal(sx, mx)
        np.testing.assert_array_equal(sy, my)


def test_stacked_on_a_folder_trains_as_on_its_decoded_arrays(tmp_path):
    root = photos(tmp_path / "photos", classes=("a", "b"), per_class=10)
    files = load_data(f"dir:{root}", image_size=12, verbose=False)
    np.savez(tmp_path / "same.npz", x=files.x.decode(), y=files.y)
    settings = dict(FAST, image_size=None, task="stacked", arch="conv", filters=(4, 4), epochs=1, noise=0.2)
    streamed = tk.pretrain(data=f"dir:{root}", out=str(tmp_path / "files"), **{**settings, "image_size": 12})
    held = tk.pretrain(data=f"npz:{tmp_path}/same.npz", out=str(tmp_path / "arrays"), **settings)
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(streamed.history[key], held.history[key], rtol=1e-4)


def test_flat_rows_are_the_decoded_inputs_flattened_in_float32(tmp_path, no_whole_decoding):
    from transferkit.finetuning.feature_cache import compute_features

    files = load_data(f"dir:{photos(tmp_path / 'photos', classes=('a',), per_class=9)}", image_size=6,
                      verbose=False).x
    rows = np.array([7, 2, 8, 0, 2])
    keras.mixed_precision.set_global_policy("mixed_float16")  # as --precision mixed_float16 sets it
    try:
        inputs = keras.Input((6, 6, 3))  # `flat`: the model's input flattened, whatever the model computes
        flat = compute_features(keras.Model(inputs, keras.layers.Dense(2)(inputs)), files, batch_size=2,
                                rows=rows, flat=True)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert flat.dtype == np.float32 and flat.shape == (5, 6 * 6 * 3)
    assert not no_whole_decoding  # batches from the pipeline; the expected values below decode one image each
    expected = np.stack([files[int(r)] for r in rows]).reshape(5, -1)
    np.testing.assert_array_equal(flat, expected)


def test_propagate_on_inputs_streams_an_image_folder(tmp_path, no_whole_decoding, fits):
    import tensorflow as tf

    spec = f"dir:{photos(tmp_path / 'photos')}"
    encoder = tk.pretrain(data=spec, task="autoencoder", out=str(tmp_path / "enc"), **FAST)
    no_whole_decoding.clear()
    fits.clear()
    result = tk.finetune(from_=str(encoder.artifact), data=spec, semi_supervised="propagate", propagate_on="inputs",
                         label_fraction=0.3, head_epochs=1, unfreeze_top=0, out=str(tmp_path / "clf"), **FAST)
    assert fits and all(isinstance(x, tf.data.Dataset) for x in fits)
    semi = result.manifest["semi_supervised"]
    assert semi["mode"] == "propagate" and semi["graph_on"] == "inputs" and semi["unlabeled_examples"] > 0
    assert np.isfinite(result.history["loss"]).all() and np.isfinite(result.metrics["test_loss"])
    assert json.loads((result.artifact / "manifest.json").read_text())["semi_supervised"]["graph_on"] == "inputs"
    assert not no_whole_decoding or max(no_whole_decoding) <= 8
