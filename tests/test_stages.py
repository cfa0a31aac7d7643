"""Progressive unfreezing, per-block learning rates, the freeze audit, cached head training."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import transferkit as tk
from transferkit.finetuning import stage_loop
from transferkit.pieces.discriminative import with_learning_rate_factors
from transferkit.errors import SettingsError
from transferkit.training.stages import gradual_stages, parse_stages

from helpers import run


def test_schedule_parses_into_stages():
    stages = parse_stages("head:2,top2:3,top4:3,all:5", num_blocks=6)
    assert [(s.name, s.top, s.epochs) for s in stages] == [
        ("head", 0, 2), ("top2", 2, 3), ("top4", 4, 3), ("all", 6, 5)]


def test_gradual_unfreezes_one_more_block_per_stage_top_first():
    assert [s.top for s in gradual_stages(head_epochs=1, epochs=2, num_blocks=3)] == [0, 1, 2, 3]


@pytest.mark.parametrize("schedule, words", [
    ("top0:3", "top0 unfreezes nothing"),
    ("head:1,top5:1", "asks for 5 blocks, more than the base has: 3"),
    ("head:0", "has no epochs"),
    ("middle:3", "is not KEYWORD:EPOCHS"),
    ("head", "is not KEYWORD:EPOCHS"),
])
def test_bad_schedules_fail_before_any_training(schedule, words, bn_encoder_dir, tmp_path):
    with pytest.raises(SettingsError, match=words):
        tk.finetune(from_=str(bn_encoder_dir), unfreeze_schedule=schedule, out=str(tmp_path / "x"), verbose=False)
    assert not (tmp_path / "x").exists()


def test_every_stage_changes_exactly_the_blocks_it_names(bn_encoder_dir, tmp_path, monkeypatch):
    snapshots = []
    original = stage_loop.freeze_all_but_top

    def recording(base, blocks, top, train_batchnorm=False):
        snapshots.append(({w.path: keras.ops.convert_to_numpy(w) for w in base.weights}, top))
        return original(base, blocks, top, train_batchnorm)

    monkeypatch.setattr(stage_loop, "freeze_all_but_top", recording)
    result = tk.finetune(from_=str(bn_encoder_dir), unfreeze_schedule="head:1,top1:1,all:1", label_fraction=0.2,
                         lr=0.01, out=str(tmp_path / "clf"), verbose=False)
    base = result.model.get_layer("encoder")
    snapshots.append(({w.path: keras.ops.convert_to_numpy(w) for w in base.weights}, None))
    block_of = {w.path: layer.name.split("_")[1] for layer in base.layers for w in layer.weights}
    bn = {w.path for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization) for w in layer.weights}
    named = {0: set(), 1: {"block3"}, 3: {"block1", "block2", "block3"}}
    for (before, top), (after, _) in zip(snapshots, snapshots[1:]):
        changed = {path for path in before if not np.array_equal(before[path], after[path])}
        assert not changed & bn, f"BatchNorm changed in stage top={top}: {changed & bn}"
        assert {block_of[p] for p in changed} == named[top]
        # every trainable (non-BatchNorm) weight of the named blocks changed, nothing else did
        assert changed == {p for p in before if block_of[p] in named[top] and p not in bn}
    epochs = len(result.history["loss"])
    assert epochs == 3  # the epoch count continues across stages


def test_one_step_with_block_rates_equals_separate_optimizers():
    def model():
        keras.utils.set_random_seed(0)
        return keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="low"), keras.layers.Dense(2, name="top")])

    x = np.random.default_rng(0).normal(size=(8, 4)).astype("float32")
    y = np.random.default_rng(1).normal(size=(8, 2)).astype("float32")
    for make in (keras.optimizers.Nadam, keras.optimizers.Adam, keras.optimizers.RMSprop,
                 lambda lr: keras.optimizers.SGD(lr, momentum=0.9)):
        ours = model()
        low = [w.path for w in ours.layers[0].weights]
        ours.compile(with_learning_rate_factors(make(0.1), {p: 1 / 2.6 for p in low}), "mse")
        ours.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        theirs = model()
        per_block = [(make(0.1 / 2.6), theirs.layers[0].trainable_weights),
                     (make(0.1), theirs.layers[1].trainable_weights)]
        for _ in range(2):
            with tf.GradientTape() as tape:
                loss = keras.ops.mean(keras.ops.square(theirs(x) - y))
            grads = tape.gradient(loss, theirs.trainable_weights)
            per_block[0][0].apply(grads[:2], per_block[0][1])
            per_block[1][0].apply(grads[2:], per_block[1][1])
        for a, b in zip(ours.weights, theirs.weights):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)


def test_lr_decay_gives_lower_blocks_lower_rates_in_the_audit(bn_encoder_dir, tmp_path, capsys):
    tk.finetune(from_=str(bn_encoder_dir), unfreeze_top=3, lr_decay=2.0, head_epochs=1, epochs=1,
                out=str(tmp_path / "clf"))
    last_audit = capsys.readouterr().out.split("stage top3")[1]
    rows = {line.split()[0]: line.split()[-1] for line in last_audit.splitlines()[1:7] if line.strip()}
    assert rows["block3"] == "1" and rows["block2"] == "0.5" and rows["block1"] == "0.25"


@pytest.mark.parametrize("schedule, semi", [pytest.param(None, "none", marks=pytest.mark.backend_neutral),
                                            ("head:1,top1:1,head:1", "none"), (None, "propagate")],
                         ids=["head", "head-after-unfreezing", "propagate-reuses-the-graph-features"])
def test_cached_head_training_gives_the_same_model(schedule, semi, encoder_dir, tmp_path, monkeypatch):
    # a head stage after a stage that trained the base must not reuse the outputs of the base before it
    from transferkit.finetuning import examples, feature_cache

    passes = []  # the number of rows of each pass of the base
    compute = feature_cache.compute_features
    for module in (stage_loop, examples):  # the stages' passes and propagate's graph
        monkeypatch.setattr(module, "compute_features", lambda model, x, *a, rows=None, **k: passes.append(
            len(x if rows is None else rows)) or compute(model, x, *a, rows=rows, **k))
    weights = []
    for cache in (True, False):
        passes.clear()
        result = tk.finetune(from_=str(encoder_dir), head_epochs=3, epochs=0, label_fraction=0.2, lr=0.01,
                             unfreeze_schedule=schedule, semi_supervised=semi, cache_features=cache,
                             out=str(tmp_path / f"clf{cache}"), verbose=False)
        weights.append([w.numpy() for w in result.model.weights])
        # the manifest says which head stages ran on cached outputs, and what computing them took
        assert [("caching_seconds" in stage) for stage in result.manifest["stages"]] == [
            cache and stage["unfreeze_top"] == 0 for stage in result.manifest["stages"]]
        if semi == "propagate":  # the graph's pass over the training split serves the first head stage too
            assert passes.count(result.manifest["split"]["sizes"]["train"]) == 1
    for cached, plain in zip(*weights):
        np.testing.assert_allclose(cached, plain, atol=1e-5)


def test_inspect_prints_the_freeze_audit(classifier_dir):
    result = run("inspect", classifier_dir)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["block", "trainable", "batchnorm"]
    rows = {line.split()[0]: line.split()[1] for line in lines[1:]}
    # the classifier fixture unfroze the top block of three
    assert rows == {"block1": "no", "block2": "no", "block3": "yes", "head": "yes"}
