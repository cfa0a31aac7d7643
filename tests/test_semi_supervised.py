"""Semi-supervised fine-tuning: pseudo-labels and label propagation over the unlabeled training pool."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.datasets import make_blobs, make_moons

from transferkit.finetuning import stage_loop
from transferkit.errors import SettingsError
from transferkit.finetuning.semi_supervised import pool_epochs, propagate_labels, pseudo_labels

from helpers import run

FAST = dict(head_epochs=3, epochs=2, unfreeze_top=1, batch_size=64, verbose=False)


def one_label_per_class(y: np.ndarray, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    labels = np.full(len(y), -1)
    for c in np.unique(y):
        i = rng.choice(np.flatnonzero(y == c))
        labels[i] = c
    return labels


def test_propagate_labels_every_point_of_two_moons_from_one_label_each():
    x, y = make_moons(200, noise=0.05, random_state=0)
    soft = propagate_labels(x, one_label_per_class(y), num_classes=2)
    assert soft.shape == (200, 2)
    np.testing.assert_allclose(soft.sum(axis=1), 1, atol=1e-5)
    assert (soft.argmax(axis=1) == y).all()


def test_a_cosine_graph_joins_rows_by_their_direction_not_their_length():
    # two classes of directions, arcs of 6 degrees (evenly spaced: one chain of neighbours) around 45 and 65
    # degrees, each row at a length from 0.1 to 10: by distance, short rows of both classes are neighbours
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 100)
    angle = np.radians(np.where(y == 0, 45, 65) + np.tile(np.linspace(-3, 3, 100), 2))
    length = np.exp(rng.uniform(np.log(0.1), np.log(10), len(y)))
    x = np.stack([np.cos(angle), np.sin(angle)], axis=1) * length[:, None]
    labels = one_label_per_class(y)
    by_angle = propagate_labels(x, labels, num_classes=2, cosine=True)
    assert (by_angle.argmax(axis=1) == y).all()
    by_distance = propagate_labels(x, labels, num_classes=2)
    assert (by_distance.argmax(axis=1) != y).any(), "the lengths do not mislead a Euclidean graph: proves nothing"
    # the angle alone decides: rescaling every row leaves the labels as they were
    rescaled = propagate_labels(x * rng.uniform(0.5, 2, (len(y), 1)), labels, num_classes=2, cosine=True)
    np.testing.assert_allclose(rescaled, by_angle, atol=1e-6)


def test_propagate_keeps_the_known_labels_one_hot():
    x, y = make_blobs(60, centers=3, random_state=1)
    labels = one_label_per_class(y)
    soft = propagate_labels(x, labels, num_classes=3)
    known = labels >= 0
    np.testing.assert_array_equal(soft[known], np.eye(3)[labels[known]])


def test_pseudo_labels_are_class_balanced_and_grow_each_round():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet([1, 1, 1], size=300)  # 3 classes, 300 unlabeled rows
    counts = []
    for round_ in (1, 2, 3):
        rows, labels = pseudo_labels(probs, round_, rounds=3, threshold=None)
        per_class = np.bincount(labels, minlength=3)
        k = int(np.ceil(round_ * 300 / (3 * 3)))
        # each class gets k, or every row predicted as that class if fewer
        predicted = np.bincount(probs.argmax(axis=1), minlength=3)
        np.testing.assert_array_equal(per_class, np.minimum(k, predicted))
        np.testing.assert_array_equal(labels, probs[rows].argmax(axis=1))
        counts.append(len(rows))
        # the chosen rows of a class are its most confident ones
        for c in range(3):
            mine = rows[labels == c]
            others = np.setdiff1d(np.flatnonzero(probs.argmax(axis=1) == c), mine)
            if len(others):
                assert probs[mine, c].min() >= probs[others, c].max()
    assert counts[0] < counts[1] < counts[2] == np.minimum(100, predicted).sum()  # k = 300 / 3 in the last


def test_pseudo_threshold_drops_unsure_predictions():
    probs = np.array([[0.99, 0.01], [0.7, 0.3], [0.2, 0.8], [0.02, 0.98]])
    rows, labels = pseudo_labels(probs, 1, rounds=1, threshold=0.9)
    np.testing.assert_array_equal(rows, [0, 3])
    np.testing.assert_array_equal(labels, [0, 1])


def test_a_stage_on_the_pool_keeps_its_number_of_steps():
    assert pool_epochs(100, labeled_steps=1, pool_steps=45) == 2
    assert pool_epochs(200, labeled_steps=3, pool_steps=45) == 13
    assert pool_epochs(1, labeled_steps=1, pool_steps=45) == 1


@pytest.fixture
def captured(monkeypatch):
    """Every phase's training examples, as `finetune` picks them."""
    seen = []

    def spy(plan, phase, propagated, backup):
        examples = real(plan, phase, propagated, backup)
        seen.append((phase.name, examples, plan.split))
        return examples

    real = stage_loop.phase_examples
    monkeypatch.setattr(stage_loop, "phase_examples", spy)
    return seen


def test_pseudo_rounds_never_take_validation_or_test_examples(encoder_dir, tmp_path, captured):
    import transferkit as tk

    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.05, semi_supervised="pseudo", pseudo_rounds=2,
                         val_fraction=0.1, out=str(tmp_path / "clf"), **FAST)
    names = [name for name, _, _ in captured]
    assert names == ["labeled", "pseudo1", "pseudo2"]
    split = captured[0][2]
    pool = np.setdiff1d(split.train, split.labeled)
    sizes = []
    for name, examples, _ in captured[1:]:
        assert not np.intersect1d(examples.rows, split.test).size
        assert not np.intersect1d(examples.rows, split.val).size
        added = np.setdiff1d(examples.rows, split.labeled)
        assert np.isin(added, pool).all() and len(added) == len(examples.rows) - len(split.labeled)
        sizes.append(len(added))
    assert 0 < sizes[0] < sizes[1] <= len(pool)
    record = result.manifest["semi_supervised"]
    assert record["mode"] == "pseudo" and record["unlabeled_examples"] == len(pool)
    assert sorted(record["unlabeled_rows"]) == pool.tolist()
    assert record["pseudo_labeled"] == {"pseudo1": sizes[0], "pseudo2": sizes[1]}
    assert json.loads((result.artifact / "manifest.json").read_text())["semi_supervised"]["mode"] == "pseudo"
    assert not (result.artifact.parent / f".{result.artifact.name}.backup").exists()


def test_the_same_seed_gives_the_same_pseudo_labels(encoder_dir, tmp_path, captured):
    import transferkit as tk

    for folder in ("a", "b"):
        tk.finetune(from_=str(encoder_dir), label_fraction=0.05, semi_supervised="pseudo", pseudo_rounds=1,
                    out=str(tmp_path / folder), **FAST)
    first, second = [examples for name, examples, _ in captured if name == "pseudo1"]
    np.testing.assert_array_equal(first.rows, second.rows)
    np.testing.assert_array_equal(first.y, second.y)


def test_propagate_trains_on_soft_labels_of_the_pool_then_the_true_labels(tmp_path, captured):
    import transferkit as tk
    from transferkit.data.sources import load_data

    # one 64-unit SELU layer, barely trained: features that keep the digits' neighbourhoods
    encoder = tk.pretrain(data="digits", units=(64,), epochs=1, out=str(tmp_path / "enc"), verbose=False).artifact
    result = tk.finetune(from_=str(encoder), label_fraction=0.05, semi_supervised="propagate",
                         out=str(tmp_path / "clf"), **FAST)
    (first, propagated, split), (second, labeled, _) = captured
    assert (first, second) == ("propagated", "labeled")
    assert propagated.soft and propagated.y.shape == (len(split.train), 10)
    np.testing.assert_array_equal(np.sort(propagated.rows), np.sort(split.train))
    y = load_data("digits").y
    # the pool's propagated labels mostly agree with the withheld true labels
    assert (propagated.y.argmax(axis=1) == y[propagated.rows]).mean() > 0.7
    np.testing.assert_array_equal(labeled.rows, split.labeled)
    assert [(s["phase"], s["name"]) for s in result.manifest["stages"]] == [
        ("propagated", "head"), ("propagated", "top1"), ("labeled", "top1")]
    assert result.manifest["semi_supervised"]["kernel"] == "knn"
    assert result.manifest["semi_supervised"]["metric"] == "cosine"  # a graph on the encoder's features
    assert 0 <= result.metrics["test_accuracy"] <= 1


def test_semi_supervised_needs_unlabeled_examples(encoder_dir, tmp_path):
    import transferkit as tk

    with pytest.raises(SettingsError, match="needs unlabeled training examples"):
        tk.finetune(from_=str(encoder_dir), label_fraction=1.0, semi_supervised="pseudo", out=str(tmp_path / "c"),
                    **FAST)
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("flags, named", [
    (["--semi-supervised", "pseudo", "--pseudo-rounds", "0"], "--pseudo-rounds must be an integer >= 1"),
    (["--semi-supervised", "pseudo", "--pseudo-threshold", "1.5"], "--pseudo-threshold must be a number in (0, 1)"),
    (["--semi-supervised", "pseudo", "--pseudo-threshold", "0"], "Received: --pseudo-threshold=0.0"),
    (["--semi-supervised", "both"], "--semi-supervised"),
])
def test_bad_semi_supervised_settings_exit_2_before_training(encoder_dir, tmp_path, flags, named):
    out = tmp_path / "clf"
    result = run("finetune", "--from", str(encoder_dir), "--out", str(out), *flags)
    assert result.exit_code == 2, result.output
    assert named in result.output
    assert not out.exists()
