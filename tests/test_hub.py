"""--backbone hub:DIR: keras-hub backbones (tiny ones built here, saved as presets), their converter, blocks, freeze."""

import json
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest

import transferkit as tk
from transferkit.finetuning.plan import plan_finetune
from transferkit.pieces.freezing import freeze_all_but_top
from transferkit.finetuning.hub import hub_blocks, load_backbone
from transferkit.recipe import Recipe

from helpers import run

# the converter of an ImageNet ResNet preset: 0..255 pixels to (x / 255 - mean) / std, resized to 24x24
MEAN, STD, SIDE = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225]), 24
STAGES = {"P2": ("conv1_", "stack0_"), "P3": ("stack1_",), "P4": ("stack2_",)}  # keras-hub's ResNet layer names


def tiny_resnet() -> keras.Model:
    """A three-stack ResNet (basic blocks, 64 filters: the least keras-hub allows) with BatchNorm statistics set."""
    backbone = keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 64, 64],
        stackwise_num_blocks=[1, 1, 1], stackwise_num_strides=[1, 2, 2], block_type="basic_block")
    rng = np.random.default_rng(0)
    for layer in backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.1, n), rng.normal(0, 0.2, n),
                               rng.uniform(0.5, 2.0, n)])
    return backbone


@pytest.fixture(scope="module")
def preset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny_resnet"
    tiny_resnet().save_to_preset(str(folder))
    keras_hub.layers.ResNetImageConverter(image_size=(SIDE, SIDE), scale=list(1 / (255 * STD)),
                                          offset=list(-MEAN / STD)).save_to_preset(str(folder))
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of 32x32 RGB images, 2 classes of 8: reddish and bluish noise."""
    from PIL import Image

    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(1)
    for name, tint in {"reddish": (1.0, 0.4, 0.2), "bluish": (0.2, 0.5, 1.0)}.items():
        (root / name).mkdir()
        for i in range(8):
            pixels = (rng.uniform(0, 255, (32, 32, 3)) * tint).astype("uint8")
            Image.fromarray(pixels, "RGB").save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def artifact(preset, photos, tmp_path_factory):
    """`transferkit finetune --backbone hub:DIR`: a head stage, then the top level unfrozen."""
    out = tmp_path_factory.mktemp("hub-clf") / "clf"
    result = run("finetune", "--data", f"dir:{photos}", "--backbone", f"hub:{preset}", "--label-fraction", "1",
                 "--head-epochs", "1", "--epochs", "1", "--unfreeze-top", "1", "--batch-size", "4", "--out", str(out))
    assert result.exit_code == 0, result.output
    return out


def weights_of(model: keras.Model) -> dict[str, np.ndarray]:
    return {w.path: keras.ops.convert_to_numpy(w).copy() for w in model.weights}


def names(blocks):
    return [(name, [layer.name for layer in layers]) for name, layers in blocks]


def test_pyramid_levels_make_the_blocks_and_the_stem_joins_the_first(preset):
    base = load_backbone(f"hub:{preset}").model
    rule, blocks = hub_blocks(base)
    assert rule == "pyramid levels" and [name for name, _ in blocks] == list(STAGES)
    for name, layers in names(blocks):
        assert layers and all(layer.startswith(STAGES[name]) for layer in layers), (name, layers)
    in_blocks = sorted(layer for _, layers in names(blocks) for layer in layers)
    assert in_blocks == sorted(layer.name for layer in base.layers if layer.weights)  # each weighted layer, once


def test_a_transformer_pyramid_and_a_backbone_without_one():
    mit = keras_hub.models.MiTBackbone(
        layerwise_depths=[1, 1], num_layers=2, layerwise_num_heads=[1, 2], layerwise_sr_ratios=[2, 1],
        max_drop_path_rate=0.0, layerwise_patch_sizes=[3, 3], layerwise_strides=[2, 2], hidden_dims=[8, 16],
        image_shape=(32, 32, 3))
    rule, blocks = hub_blocks(mit)
    assert rule == "pyramid levels" and [name for name, _ in blocks] == ["P1", "P2"]
    for i, (_, layers) in enumerate(names(blocks)):
        assert layers[:2] == [f"patch_and_embed_{i}", f"hierarchical_encoder_{i}_0"]
        assert isinstance(mit.get_layer(layers[2]), keras.layers.LayerNormalization)
    vgg = keras_hub.models.VGGBackbone(stackwise_num_repeats=[1, 1], stackwise_num_filters=[4, 8],
                                       image_shape=(None, None, 3))
    assert hub_blocks(vgg)[0] == "named stages"   # no pyramid: the rule of --base FILE
    assert names(hub_blocks(vgg)[1]) == [("block1", ["block1_conv1"]), ("block2", ["block2_conv1"])]


def tiny_dinov2() -> keras.Model:
    return keras_hub.models.DINOV2Backbone(patch_size=4, num_layers=2, hidden_dim=8, num_heads=2, intermediate_dim=16,
                                           image_shape=(16, 16, 3), position_embedding_shape=(16, 16))


def test_levels_inside_one_layer_make_one_block_and_a_final_norm_joins_the_top_block():
    rule, blocks = hub_blocks(tiny_dinov2())   # its levels stage1, stage2 are all computed by its encoder layer
    assert rule == "pyramid levels"
    assert [(name, [layer.split("_backbone_")[-1] for layer in layers]) for name, layers in names(blocks)] == [
        ("stem", ["embeddings"]), ("stage1", ["encoder", "layernorm"])]


def test_tokens_are_averaged_and_a_preset_without_converter_gets_0_255_pixels(photos, tmp_path, capsys):
    tiny_dinov2().save_to_preset(str(tmp_path / "dino"))   # a backbone alone: no image_converter.json
    recipe = Recipe().replace(data=f"dir:{photos}", backbone=f"hub:{tmp_path / 'dino'}", head_epochs=1, epochs=1,
                              label_fraction=1.0)
    clf = plan_finetune(recipe).clf
    assert "has no image converter: the backbone gets 0..255 pixels" in capsys.readouterr().err
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p)) for p in sorted(photos.glob("*/*.png"))[:3]])
    resized = keras.ops.image.resize(x, (16, 16), interpolation="bilinear")   # the backbone's fixed input size
    original = keras_hub.models.Backbone.from_preset(str(tmp_path / "dino"))
    tokens = keras.ops.convert_to_numpy(original({"images": resized}))
    assert tokens.shape == (3, 17, 8)   # the class token and 16 patches
    np.testing.assert_allclose(clf.features(x), tokens.mean(axis=1), rtol=1e-4, atol=1e-5)


def test_the_preset_converter_is_built_in_so_the_classifier_takes_raw_images(preset, photos):
    recipe = Recipe().replace(data=f"dir:{photos}", backbone=f"hub:{preset}", head_epochs=1, epochs=1,
                              label_fraction=1.0)
    clf = plan_finetune(recipe).clf
    assert clf.model.input.shape[1:] == (32, 32, 3)
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p)) for p in sorted(photos.glob("*/*.png"))[:4]])
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(x, (SIDE, SIDE), interpolation="bilinear"))
    original = keras_hub.models.Backbone.from_preset(str(preset))
    expected = np.mean(keras.ops.convert_to_numpy(original((resized / 255 - MEAN) / STD)), axis=(1, 2))
    np.testing.assert_allclose(clf.features(x), expected, rtol=1e-4, atol=1e-5)
    assert clf.info["kind"] == "hub" and clf.info["input_size"] == [SIDE, SIDE, 3]
    assert clf.info["image_converter"]["class"] == "ResNetImageConverter"
    for top, trained in ((1, ("stack2_",)), (2, ("stack1_", "stack2_"))):
        freeze_all_but_top(clf.base, clf.blocks, top)
        expected_paths = {w.path for layer in clf.base.layers if layer.name.startswith(trained)
                          and isinstance(layer, keras.layers.Conv2D) for w in layer.weights}
        assert {w.path for w in clf.base.trainable_weights} == expected_paths


def test_a_call_without_training_runs_in_inference_mode_despite_the_converters_resizing(preset, photos):
    # Keras's Resizing defaults `training` to True and passes it on: without InferenceByDefault, `model(x)`
    # would run the (still trainable) BatchNorm on batch statistics, update them, and drop out
    recipe = Recipe().replace(data=f"dir:{photos}", backbone=f"hub:{preset}", head_epochs=1, epochs=1,
                              label_fraction=1.0, dropout=0.5)
    clf = plan_finetune(recipe).clf
    x = np.random.default_rng(0).uniform(0, 255, (4, 32, 32, 3)).astype("float32")
    before = weights_of(clf.base)
    default = keras.ops.convert_to_numpy(clf.model(x))
    np.testing.assert_array_equal(default, keras.ops.convert_to_numpy(clf.model(x, training=False)))
    after = weights_of(clf.base)
    assert all(np.array_equal(before[path], after[path]) for path in before)
    assert not np.allclose(keras.ops.convert_to_numpy(clf.features(x, training=True)), clf.features(x))


def test_finetune_trains_the_top_level_only_and_keeps_batchnorm_bit_identical(preset, artifact):
    before = weights_of(keras_hub.models.Backbone.from_preset(str(preset)))
    after = weights_of(tk.load_model(artifact).get_layer("res_net_backbone"))
    assert set(after) == set(before)
    changed = {path for path in after if not np.array_equal(before[path], after[path])}
    assert changed == {path for path in before if path.startswith("stack2_") and path.endswith("_conv/kernel")}
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert manifest["blocks"] == ["P2", "P3", "P4"] and manifest["base"]["blocks_rule"] == "pyramid levels"
    assert manifest["base"]["requires"][0]["module"] == "keras_hub"
    rows = tk.inspect(artifact, verbose=False)
    assert [(r.block, r.trainable, r.batchnorm) for r in rows] == [
        ("P2", False, "inference"), ("P3", False, "inference"), ("P4", True, "inference"), ("head", True, "-")]


def test_the_artifact_reloads_in_a_fresh_process_after_import_transferkit(artifact, photos, tmp_path):
    x = np.stack([keras.utils.img_to_array(keras.utils.load_img(p)) for p in sorted(photos.glob("*/*.png"))])
    np.save(tmp_path / "x.npy", x)
    expected = keras.ops.convert_to_numpy(tk.load_model(artifact)(x, training=False))
    code = ("import sys, numpy as np, transferkit, keras\n"
            f"x = np.load({str(tmp_path / 'x.npy')!r})\n"
            f"a = keras.models.load_model({str(artifact / 'model.keras')!r})(x, training=False)\n"
            f"b = transferkit.load_model({str(artifact)!r})(x, training=False)\n"
            "print(np.abs(np.asarray(a)).sum(), np.abs(np.asarray(a) - np.asarray(b)).max())\n"
            f"np.save({str(tmp_path / 'p.npy')!r}, np.asarray(a))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 0.0
    np.testing.assert_allclose(np.load(tmp_path / "p.npy"), expected, rtol=1e-5, atol=1e-6)


def test_inspect_and_lr_find_take_a_hub_backbone(preset, photos):
    shown = run("inspect", "--backbone", f"hub:{preset}")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].endswith("3 blocks by pyramid levels") and "ResNetBackbone" in lines[0]
    assert lines[1].split() == ["layer", "type", "output", "params", "block"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["conv1_conv"][-1] == "P2" and rows["stack2_block0_2_bn"][-1] == "P4"
    assert lines[2].split()[1:2] == ["InputLayer"] and lines[2].split()[-1] == "-"
    found = run("lr-find", "--data", f"dir:{photos}", "--backbone", f"hub:{preset}", "--label-fraction", "1",
                "--num-steps", "10", "--batch-size", "4")
    assert found.exit_code == 0, found.output
    assert "ResNetBackbone" in found.output and "valley" in found.output


@pytest.fixture(scope="module")
def text_preset(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hub") / "tiny_bert"
    keras_hub.models.BertBackbone(vocabulary_size=10, num_layers=1, num_heads=1, hidden_dim=4, intermediate_dim=4,
                                  max_sequence_length=8).save_to_preset(str(folder))
    return folder


@pytest.mark.parametrize("args, expected", [
    (["--backbone", "hub:"], "names no preset; expected hub:PRESET"),
    (["--backbone", "hub:{missing}"], "is not a keras-hub backbone preset that loads"),
    (["--backbone", "hub:{text}"], "is a BertBackbone, which takes"),
    (["--backbone", "hub:{preset}", "--weights", "imagenet"], "--weights imagenet goes with a Keras Applications"),
])
def test_bad_hub_backbones_exit_2_with_one_line(preset, text_preset, tmp_path, args, expected):
    args = [a.format(preset=preset, text=text_preset, missing=tmp_path / "missing") for a in args]
    result = run("finetune", "--data", "digits", "--head-epochs", "1", "--epochs", "1", "--out", str(tmp_path / "out"),
                 *args)
    assert result.exit_code == 2, result.output
    assert expected in result.output and len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists()


def test_a_preset_that_cannot_download_exits_1_saying_to_pass_a_folder(monkeypatch, tmp_path):
    def offline(*args, **kwargs):
        raise ConnectionError("Failed to resolve 'api.kaggle.com' (Name or service not known)")

    monkeypatch.setattr(keras_hub.models.Backbone, "from_preset", offline)
    result = run("finetune", "--data", "digits", "--backbone", "hub:resnet_18_imagenet", "--out", str(tmp_path / "out"))
    assert result.exit_code == 1, result.output
    assert "Could not download" in result.output and "--backbone hub:DIR" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_without_keras_hub_finetune_and_loading_exit_2_saying_how_to_install(monkeypatch, preset, artifact, tmp_path):
    monkeypatch.setitem(sys.modules, "keras_hub", None)  # `import keras_hub` raises ModuleNotFoundError
    for args in (["finetune", "--data", "digits", "--backbone", f"hub:{preset}", "--out", str(tmp_path / "out")],
                 ["inspect", "--backbone", f"hub:{preset}"], ["inspect", str(artifact)]):
        result = run(*args)
        assert result.exit_code == 2, result.output
        assert "pip install 'transferkit[hub]'" in result.output and len(result.output.strip().splitlines()) == 1


def test_import_and_help_import_neither_keras_hub_nor_tensorflow():
    code = ("import sys, transferkit; from click.testing import CliRunner; from transferkit.cli import cli\n"
            "for args in (['--help'], ['finetune', '--help'], ['inspect', '--help']):\n"
            "    assert CliRunner().invoke(cli, args, obj={}).exit_code == 0\n"
            "print(sorted(m for m in ('keras_hub', 'tensorflow', 'keras') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
