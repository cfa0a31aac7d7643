"""Data specs, the seeded split and the label fraction."""

import numpy as np
import pytest
from PIL import Image

from transferkit.data import load_data, parse_spec, pipeline, split_data
from transferkit.errors import SettingsError


def test_digits_is_the_embedded_default():
    data = load_data()
    assert data.x.shape == (1797, 8, 8, 1)
    assert data.num_classes == 10
    assert data.value_range == (0.0, 16.0)
    assert data.x.max() == 16.0


def test_split_is_disjoint_complete_and_reproducible():
    data = load_data("digits")
    a = split_data(data, seed=3, test_fraction=0.2, val_fraction=0.1, label_fraction=0.05)
    b = split_data(data, seed=3, test_fraction=0.2, val_fraction=0.1, label_fraction=0.05)
    parts = [a.train, a.val, a.test]
    assert sum(map(len, parts)) == len(data.x)
    assert len(np.unique(np.concatenate(parts))) == len(data.x)
    assert len(a.test) == round(0.2 * len(data.x))
    for x, y in zip(parts + [a.labeled], [b.train, b.val, b.test, b.labeled]):
        np.testing.assert_array_equal(x, y)
    other = split_data(data, seed=4)
    assert not np.array_equal(a.test, other.test)


def test_split_is_stratified():
    data = load_data("digits")
    split = split_data(data, seed=0, test_fraction=0.2)
    overall = np.bincount(data.y) / len(data.y)
    in_test = np.bincount(data.y[split.test]) / len(split.test)
    assert np.abs(overall - in_test).max() < 0.01


@pytest.mark.parametrize("fraction", [0.01, 0.05, 0.1, 1.0])
def test_label_fraction_keeps_that_share_of_each_class_of_train(fraction):
    data = load_data("digits")
    split = split_data(data, seed=0, label_fraction=fraction)
    assert set(split.labeled) <= set(split.train)
    assert len(split.labeled) == max(10, round(fraction * len(split.train)))
    per_class = np.bincount(data.y[split.labeled], minlength=10)
    assert per_class.min() >= 1
    expected = fraction * np.bincount(data.y[split.train])
    assert np.abs(per_class - expected).max() <= 1


def test_npz_with_and_without_labels(tmp_path):
    x = np.random.default_rng(0).uniform(0, 1, (20, 6)).astype("float32")
    np.savez(tmp_path / "labeled.npz", x=x, y=np.arange(20) % 2)
    np.savez(tmp_path / "unlabeled.npz", x=x)
    labeled = load_data(f"npz:{tmp_path}/labeled.npz")
    assert labeled.input_shape == (6,) and labeled.num_classes == 2
    unlabeled = load_data(f"npz:{tmp_path}/unlabeled.npz")
    assert unlabeled.y is None
    split = split_data(unlabeled, seed=0)
    np.testing.assert_array_equal(split.labeled, split.train)


def write_images(root, classes, per_class=3, size=(10, 12), mode="L"):
    rng = np.random.default_rng(0)
    for c in classes:
        folder = root / c if c else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size[1], size[0]) + (() if mode == "L" else (3,)), dtype=np.uint8)
            Image.fromarray(pixels, mode=mode).save(folder / f"{c or 'img'}{i}.png")


def test_image_folder_one_subfolder_per_class(tmp_path):
    write_images(tmp_path, ["cat", "dog"], per_class=3)
    data = load_data(f"dir:{tmp_path}")
    assert data.x.shape == (6, 12, 10, 1)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.y, [0, 0, 0, 1, 1, 1])
    resized = load_data(f"dir:{tmp_path}", image_size=16)
    assert resized.input_shape == (16, 16, 1)


def test_image_folder_of_images_alone_is_unlabeled(tmp_path):
    write_images(tmp_path, [None], per_class=4, mode="RGB")
    data = load_data(f"dir:{tmp_path}")
    assert data.y is None and data.input_shape == (12, 10, 3)


def test_tfds_spec_loads_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        data = load_data("tfds:mnist:train")
    assert data.x.shape == (12, 28, 28, 1)
    assert data.num_classes == 10 and data.y is not None


@pytest.mark.parametrize("spec, words", [
    ("csv:foo", "Unknown data scheme 'csv'"),
    ("npz:/nonexistent/file.npz", "does not exist"),
    ("dir:/nonexistent/folder", "does not exist"),
    ("npz:", "needs a value"),
])
def test_bad_specs_say_what_was_expected(spec, words):
    with pytest.raises(SettingsError, match=words):
        parse_spec(spec)


def test_empty_folder_is_refused(tmp_path):
    with pytest.raises(SettingsError, match="holds no images"):
        load_data(f"dir:{tmp_path}")


def test_npz_without_x_is_refused(tmp_path):
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((3, 2)))
    with pytest.raises(SettingsError, match="expected one named 'x'"):
        load_data(f"npz:{tmp_path}/bad.npz")


def test_pipeline_batches_and_keeps_pairs():
    x = np.arange(10, dtype="float32")[:, None]
    batches = list(pipeline(x, np.arange(10), batch_size=4).as_numpy_iterator())
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    for bx, by in batches:
        np.testing.assert_array_equal(bx[:, 0], by)
