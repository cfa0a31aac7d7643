"""--class-weight, --mixup / --cutmix and --ema: what reaches fit, what the batches hold, what is saved."""

import json

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.pieces.augmentation import mix_batches
from transferkit.finetuning.class_weights import resolve_class_weight
from transferkit.data.sources import load_data

from helpers import assert_config_round_trip, run

# class weights, MixUp/CutMix, EMA, augmentation and TTA hold on every backend: `make test-jax` runs these
pytestmark = pytest.mark.backend_neutral


def head_weights(artifact):
    return [np.asarray(w) for w in tk.load_model(artifact).get_layer("head").get_weights()]


# --- class weights -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def imbalanced(tmp_path_factory):
    """Two overlapping classes, 9:1, and an encoder pretrained on them."""
    folder = tmp_path_factory.mktemp("imbalanced")
    rng = np.random.default_rng(0)
    y = np.array([0] * 900 + [1] * 100)
    x = rng.normal(size=(1000, 4)).astype("float32") + 1.2 * y[:, None].astype("float32")
    np.savez(folder / "data.npz", x=x, y=y)
    spec = f"npz:{folder}/data.npz"
    enc = tk.pretrain(data=spec, epochs=2, units=(8,), out=str(folder / "enc"), verbose=False).artifact
    return spec, enc, folder


def minority_recall(artifact, spec):
    result = tk.evaluate(artifact, spec, verbose=False)
    return next(c["recall"] for c in result.report["predictions"]["deterministic"]["per_class"] if c["class"] == "1")


def test_balanced_class_weights_reach_fit_and_raise_minority_recall(imbalanced, monkeypatch):
    from sklearn.utils.class_weight import compute_class_weight

    spec, enc, folder = imbalanced
    seen = []
    fit = keras.Model.fit

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("class_weight"))
        return fit(self, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "fit", spy)
    runs = {}
    for setting in ("none", "balanced"):
        runs[setting] = tk.finetune(from_=str(enc), data=spec, class_weight=setting, head_epochs=15, unfreeze_top=0,
                                    epochs=0, lr=0.01, schedule="constant", patience=0, dropout=0.0, seed=0,
                                    out=str(folder / setting), verbose=False)
    labeled = json.loads((folder / "balanced" / "split.json").read_text())["labeled"]
    labels = load_data(spec).y[labeled]
    expected = compute_class_weight("balanced", classes=np.array([0, 1]), y=labels)
    assert seen[0] is None
    assert seen[1].keys() == {0, 1}
    np.testing.assert_allclose([seen[1][0], seen[1][1]], expected, rtol=1e-12)
    assert runs["balanced"].manifest["class_weight"]["weights"] == pytest.approx(
        {"0": expected[0], "1": expected[1]})
    assert minority_recall(runs["balanced"].artifact, spec) > minority_recall(runs["none"].artifact, spec) + 0.1


def test_a_class_weight_file_gives_named_classes_their_weight_and_others_one(tmp_path):
    path = tmp_path / "weights.json"
    path.write_text(json.dumps({"cat": 3.0}))
    assert resolve_class_weight(str(path), np.array([0, 1, 2]), ("cat", "dog", "owl")) == {0: 3.0, 1: 1.0, 2: 1.0}


# --- bad settings: exit 2, one line, before training -------------------------------------------------------

@pytest.mark.parametrize("flags, words", [
    (["--mixup", "-1"], "--mixup must be a number >= 0 (MixUp's alpha; 0: off). Received: --mixup=-1.0"),
    (["--cutmix", "2"], "cutmix must be a number in [0, 1]"),
    (["--augment", "blur"], "'blur' is not one of them. Received: augment='blur'"),
    (["--ema", "1.5"], "ema must be a number in (0, 1)"),
    (["--class-weight", "heavy"], "class_weight must be balanced, none or a JSON file"),
    (["--class-weight", "WEIGHTS"], "names class 'cat', which the data does not have; expected one of 0, 1, 2"),
])
def test_bad_settings_exit_2_with_one_line_before_training(flags, words, encoder_dir, tmp_path):
    weights = tmp_path / "weights.json"
    weights.write_text(json.dumps({"1": 2.0, "cat": 3.0}))
    out = tmp_path / "out"
    args = ["finetune", "--from", str(encoder_dir), "--head-epochs", "1", "--epochs", "1", "--out", str(out),
            *[str(weights) if f == "WEIGHTS" else f for f in flags]]
    result = run(*args)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and words in errors[0], result.output
    assert "stage head" not in result.output and not out.exists()


# --- MixUp / CutMix ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mixup, cutmix", [(0.4, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixed_batches_mix_images_and_one_hot_targets_in_the_same_proportions(mixup, cutmix):
    import tensorflow as tf

    # image i is the constant i, its target one-hot i: a mixed image's mean is then sum_k target_k * k
    n = 16
    x = np.broadcast_to(np.arange(n, dtype="float32")[:, None, None, None], (n, 8, 8, 1)).copy()
    y = np.eye(n, dtype="float32")
    batches = mix_batches(tf.data.Dataset.from_tensor_slices((x, y)).batch(n).repeat(3), mixup, cutmix, seed=1)
    mixed_any = False
    for images, targets in batches:
        images, targets = images.numpy(), targets.numpy()
        np.testing.assert_allclose(targets.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_allclose(images.mean(axis=(1, 2, 3)), targets @ np.arange(n), atol=1e-3)
        mixed_any |= bool(np.any(targets.max(axis=1) < 0.99))
    assert mixed_any


def test_finetune_with_mixup_trains_on_soft_targets_uncached(encoder_dir, tmp_path):
    result = tk.finetune(from_=str(encoder_dir), label_fraction=0.1, head_epochs=2, unfreeze_top=0, epochs=0,
                         mixup=0.2, dropout=0.0, lr=0.01, out=str(tmp_path / "clf"), verbose=False)
    assert result.manifest["mixup"] == 0.2 and [s["cached"] for s in result.manifest["stages"]] == [False]
    assert result.metrics["test_accuracy"] > 0  # evaluated on the true (integer) labels after soft training


# --- EMA ---------------------------------------------------------------------------------------------------

def test_saved_weights_are_the_moving_average_of_the_trained_weights(encoder_dir, tmp_path):
    # one full batch per epoch, so each epoch is one optimizer step; constant SGD, no early stopping
    settings = dict(from_=str(encoder_dir), label_fraction=0.05, batch_size=256, unfreeze_top=0, epochs=0,
                    optimizer="sgd", lr=0.5, schedule="constant", dropout=0.0, seed=0, verbose=False)
    w1 = head_weights(tk.finetune(head_epochs=1, patience=0, out=str(tmp_path / "one"), **settings).artifact)
    w2 = head_weights(tk.finetune(head_epochs=2, patience=0, out=str(tmp_path / "two"), **settings).artifact)
    decay = 0.5
    # Keras's EMA: the average starts at the weights after step 1, then avg = decay * avg + (1 - decay) * w
    expected = [decay * a + (1 - decay) * b for a, b in zip(w1, w2)]
    ema = tk.finetune(head_epochs=2, patience=0, ema=decay, out=str(tmp_path / "ema"), **settings)
    assert ema.manifest["ema"] == decay
    for saved, want, raw in zip(head_weights(ema.artifact), expected, w2):
        np.testing.assert_allclose(saved, want, atol=1e-6)
        assert np.abs(raw - want).max() > 1e-3  # the average is not the last weights
    # with early stopping on, the kept (best) weights are the average too, at the best epoch
    kept = tk.finetune(head_epochs=2, patience=5, ema=decay, out=str(tmp_path / "kept"), **settings)
    best = int(np.argmin(kept.history["val_loss"]))
    for saved, want in zip(head_weights(kept.artifact), (w1, expected)[best]):
        np.testing.assert_allclose(saved, want, atol=1e-6)


def test_exact_cutmix_config_round_trips():
    from transferkit.pieces.augmentation import ExactCutMix

    assert_config_round_trip(ExactCutMix(factor=0.5, seed=3))
