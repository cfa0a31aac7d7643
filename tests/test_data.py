"""Data specs, the seeded split and the label fraction."""

import numpy as np
import pytest
from PIL import Image

from transferkit.data.sources import Data, load_data, parse_spec, pipeline, require_classes, split_data
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


# ---- what must not change: the digits' split and fingerprint


def reference_split(y, seed, test_fraction=0.2, val_fraction=0.1, label_fraction=1.0):
    """A copy of the split as it was first written (stratified order, largest-remainder label subset)."""
    n, rng = len(y), np.random.default_rng(seed)
    n_test, n_val = max(1, int(round(test_fraction * n))), int(round(val_fraction * n))
    keys = np.empty(n)
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        keys[rng.permutation(idx)] = (np.arange(len(idx)) + rng.random()) / len(idx)
    order = np.lexsort((rng.random(n), keys))
    test, val, train = order[:n_test], order[n_test:n_test + n_val], order[n_test + n_val:]
    label_rng = np.random.default_rng(seed)
    classes, counts = np.unique(y[train], return_counts=True)
    wanted = label_fraction * counts
    take = np.maximum(1, np.floor(wanted)).astype(int)
    short = int(round(label_fraction * len(train))) - take.sum()
    if short > 0:
        take[np.argsort(-(wanted - np.floor(wanted)), kind="stable")[:short]] += 1
    take = np.minimum(take, counts)
    labeled = np.sort(np.concatenate([label_rng.permutation(train[y[train] == c])[:k] for c, k in zip(classes, take)]))
    return np.sort(train), np.sort(val), np.sort(test), labeled


@pytest.mark.parametrize("seed, label_fraction", [(0, 1.0), (3, 0.05), (42, 0.1)])
def test_digits_split_is_the_one_it_always_was(seed, label_fraction):
    data = load_data("digits")
    split = split_data(data, seed=seed, label_fraction=label_fraction)
    for ours, reference in zip((split.train, split.val, split.test, split.labeled),
                               reference_split(data.y, seed, label_fraction=label_fraction)):
        np.testing.assert_array_equal(ours, reference)


def test_fingerprint_is_the_hash_of_all_bytes_as_before(tmp_path):
    import hashlib

    assert load_data("digits").fingerprint == "faf2d98f61250c1c"  # recorded before image folders changed
    x = np.random.default_rng(1).normal(size=(300, 7, 5)).astype("float32")
    np.savez(tmp_path / "a.npz", x=x, y=np.arange(300) % 4)
    whole = hashlib.sha256(x[..., None].tobytes())
    whole.update((np.arange(300) % 4).astype("int64").tobytes())
    assert load_data(f"npz:{tmp_path}/a.npz").fingerprint == whole.hexdigest()[:16]


# ---- npz: labels, memory mapping


def test_npz_string_labels_become_sorted_class_names(tmp_path):
    labels = np.array(["dog", "cat", "emu", "cat", "dog", "emu"] * 3)
    np.savez(tmp_path / "s.npz", x=np.zeros((18, 2), "float32"), y=labels)
    data = load_data(f"npz:{tmp_path}/s.npz")
    assert data.class_names == ("cat", "dog", "emu") and data.num_classes == 3
    np.testing.assert_array_equal(np.array(data.class_names)[data.y], labels)


def test_npz_labels_that_are_not_whole_numbers_are_refused(tmp_path):
    np.savez(tmp_path / "f.npz", x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 1.5, 2.0]))
    with pytest.raises(SettingsError) as err:
        load_data(f"npz:{tmp_path}/f.npz")
    assert str(err.value) == (f"Array 'y' in '{tmp_path}/f.npz' has label 1.5 at index 2; expected whole numbers "
                              "(class numbers 0, 1, 2, ...) or strings (class names).")
    np.savez(tmp_path / "w.npz", x=np.zeros((4, 2)), y=np.array([0.0, 1.0, 1.0, 2.0]))
    assert load_data(f"npz:{tmp_path}/w.npz").y.tolist() == [0, 1, 1, 2]


def test_npz_object_labels_are_refused_without_unpickling(tmp_path):
    np.savez(tmp_path / "o.npz", x=np.zeros((2, 2)), y=np.array(["a", 1], dtype=object))
    with pytest.raises(SettingsError, match=r"Array 'y' in '.*o.npz' cannot be read: Object arrays"):
        load_data(f"npz:{tmp_path}/o.npz")


def test_uncompressed_npz_inputs_are_memory_mapped(tmp_path):
    x = np.arange(2 * 3 * 4, dtype="float32").reshape(2, 3, 4)
    path = tmp_path / "m.npz"
    np.savez(path, x=x, y=np.array([0, 1]))
    data = load_data(f"npz:{path}")
    np.testing.assert_array_equal(data.x[..., 0], x)
    # change the file behind the loaded data: a mapped array sees the change, a copy would not
    raw = bytearray(path.read_bytes())
    at = raw.find(x.tobytes())
    raw[at:at + 4] = np.float32(-7).tobytes()
    with open(path, "r+b") as f:
        f.write(raw)
    assert data.x[0, 0, 0, 0] == -7
    np.savez_compressed(tmp_path / "c.npz", x=x)
    np.testing.assert_array_equal(load_data(f"npz:{tmp_path}/c.npz").x[..., 0], x)


# ---- classes the split and fine-tuning need


def test_a_class_the_split_leaves_out_of_training_is_refused():
    y = np.r_[np.zeros(20, int), np.ones(20, int), [2]]
    data = Data(np.zeros((41, 3), "float32"), y, "npz:rare.npz", ("a", "b", "rare"), (0.0, 1.0))
    assert 40 in split_data(data, seed=0).train
    with pytest.raises(SettingsError, match=r"Class 'rare' of 'npz:rare.npz' has 1 example\(s\), all in the test "
                                            r"or validation part .* expected at least one in training: give each class 2 or more"):
        split_data(data, seed=2)  # seed 2 puts the single example in the test part


def test_require_classes_refuses_a_single_class():
    y = np.zeros(10, int)
    with pytest.raises(SettingsError, match=r"has 1 class \('cat'\); expected at least 2 classes"):
        require_classes(Data(np.zeros((10, 2)), y, "dir:pets", ("cat",), (0.0, 1.0)))
    with pytest.raises(SettingsError, match="has no labels"):
        require_classes(Data(np.zeros((10, 2)), None, "npz:u.npz", None, (0.0, 1.0)))
    require_classes(load_data("digits"), 10)
