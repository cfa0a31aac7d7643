"""`tfds:` data stays a tf.data pipeline: a lazy source of the split's records, read pass by pass, never one array."""

import numpy as np
import pytest
from PIL import Image

import transferkit as tk
from transferkit.data.sources import load_data, pipeline, split_data
from transferkit.data.image_files import ImageFiles

tfds = pytest.importorskip("tensorflow_datasets")
from transferkit.data.tfds_source import TfdsImages  # noqa: E402

FAST = dict(units=(8,), lr=1e-3, batch_size=8, verbose=False)


def held_by_tfds(name):
    """The split as tfds itself gives it: (images, labels) arrays."""
    examples = list(tfds.as_numpy(tfds.load(name, split="train", shuffle_files=False)))
    return np.stack([e["image"] for e in examples]).astype("float32"), np.array([e["label"] for e in examples])


def test_a_tfds_split_loads_as_a_lazy_source_that_streams_what_tfds_holds():
    with tfds.testing.mock_data(num_examples=80):
        data = load_data("tfds:mnist")
        images, labels = held_by_tfds("mnist")
        assert isinstance(data.x, TfdsImages) and not isinstance(data.x, np.ndarray)
        assert data.x.shape == (80, 28, 28, 1) and data.num_classes == 10
        np.testing.assert_array_equal(data.y, labels)
        split = split_data(data, seed=3)
        part = data.x[split.train]
        assert isinstance(part, TfdsImages) and part.rows.tolist() == split.train.tolist()
        streamed = np.concatenate([b.numpy() for b in pipeline(part, batch_size=8)])
        np.testing.assert_array_equal(streamed, images[split.train])
        shuffled = [(x.numpy(), y.numpy()) for x, y in pipeline(part, data.y[split.train], 8, shuffle=True, seed=1)]
        xs, ys = np.concatenate([x for x, _ in shuffled]), np.concatenate([y for _, y in shuffled])
        rows = [int(np.flatnonzero((images == x).all(axis=(1, 2, 3)))[0]) for x in xs]
        assert sorted(rows) == sorted(split.train.tolist()) and rows != sorted(rows)
        np.testing.assert_array_equal(ys, labels[rows])
        picked = np.array([5, 0, 5])  # out of order, repeated: read from the copy on disk
        np.testing.assert_array_equal(part.gather(picked).numpy(), images[split.train][picked])
        np.testing.assert_array_equal(part[[4, 1]].decode(), images[split.train][[4, 1]])


def test_tfds_images_of_any_size_take_the_median_or_the_size_asked_for():
    with tfds.testing.mock_data(num_examples=9):
        examples = list(tfds.as_numpy(tfds.load("cats_vs_dogs", split="train", shuffle_files=False)))
        heights, widths = sorted(e["image"].shape[0] for e in examples), sorted(e["image"].shape[1] for e in examples)
        assert load_data("tfds:cats_vs_dogs").input_shape == (heights[4], widths[4], 3)  # the lower medians
        resized = load_data("tfds:cats_vs_dogs", image_size=16).x.decode()
        # decoded by Pillow from the same JPEG bytes as tfds stores them, then resized as Keras's
        # image_dataset_from_directory resizes (bilinear, no antialiasing), as a folder's images are
        raw = tfds.load("cats_vs_dogs", split="train", shuffle_files=False,
                        decoders={"image": tfds.decode.SkipDecoding()})
        import io
        import tensorflow as tf
        expected = [tf.image.resize(np.asarray(Image.open(io.BytesIO(e["image"])).convert("RGB")), (16, 16)).numpy()
                    for e in tfds.as_numpy(raw)]
        np.testing.assert_allclose(resized, np.stack(expected), rtol=0, atol=1e-4)


@pytest.fixture
def never_one_array(monkeypatch):
    """Turning a tfds source into one array fails; every `fit` is handed a tf.data.Dataset (recorded)."""
    import keras
    import tensorflow as tf

    def refuse(self, dtype=None, copy=None):
        raise AssertionError(f"{len(self)} tfds images made into one array")

    fed = []
    fit = keras.Model.fit

    def recording_fit(self, x=None, *args, **kwargs):
        fed.append(isinstance(x, tf.data.Dataset))
        return fit(self, x, *args, **kwargs)

    monkeypatch.setattr(TfdsImages, "__array__", refuse)
    monkeypatch.setattr(keras.Model, "fit", recording_fit)
    return fed


def test_a_tfds_run_trains_on_a_tf_data_pipeline_and_never_holds_the_split(tmp_path, never_one_array):
    with tfds.testing.mock_data(num_examples=80):
        encoder = tk.pretrain(data="tfds:mnist", task="denoising", noise=0.2, epochs=1, out=str(tmp_path / "enc"),
                              **FAST)
        classifier = tk.finetune(from_=str(encoder.artifact), data="tfds:mnist", head_epochs=1, epochs=1,
                                 unfreeze_top=1, out=str(tmp_path / "clf"), **FAST)
        report = tk.evaluate(classifier.artifact, "tfds:mnist", verbose=False)
    assert never_one_array and all(never_one_array)
    assert report.metrics["examples"] == classifier.manifest["split"]["sizes"]["test"]
    assert classifier.manifest["data"]["fingerprint"] == encoder.manifest["data"]["fingerprint"]


def test_a_tfds_source_is_an_image_source_every_pass_streams():
    """What lets every command take it: it is an `ImageFiles` (the lazy image kind), holding row numbers only."""
    with tfds.testing.mock_data(num_examples=20):
        x = load_data("tfds:mnist").x
    assert isinstance(x, ImageFiles)
    held = [v for v in vars(x).values() if isinstance(v, np.ndarray)]
    assert [v.dtype for v in held] == [np.int64] and held[0].shape == (20,)  # the rows, 8 bytes each
