"""Keras Applications backbones: registry, blocks, preprocessing, weights files, frozen BatchNorm."""

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.pieces.backbones import (
    BACKBONES, ImagenetPreprocess, InferenceByDefault, RgbToGray, blocks_of, build_backbone, to_pixels,
)

from helpers import assert_config_round_trip, assert_reloads_with_same_outputs


@pytest.mark.parametrize("name, first, last, count", [
    ("mobilenetv2", "Conv1", "Conv_1", 19),          # stem, expanded_conv, block_1..16, top
    ("efficientnetb0", "stem", "top", 9),            # stem, block1..7, top
    ("resnet50", "conv1", "conv5_block3", 17),       # conv1, 3 + 4 + 6 + 3 residual blocks
    ("resnet50v2", "conv1", "conv5_block3", 17),     # the same; the final BatchNorm is in the last block
    ("densenet121", "conv1", "conv5_block16", 62),   # conv1, 6 + 12 + 24 + 16 dense blocks, 3 transitions
    ("vgg16", "block1", "block5", 5),
    ("mobilenetv3small", "conv", "conv_1", 13),      # stem, expanded_conv, _1.._10, top
    ("efficientnetv2b0", "stem", "top", 8),          # stem, block1..6, top
    ("convnexttiny", "stem", "layer_normalization", 23),  # stem, 3+3+9+3 blocks, 3 downsamplings, final norm
])
def test_registry_names_each_architectures_blocks(name, first, last, count):
    base = build_backbone(name, "none", (32, 32, 3))
    blocks = blocks_of(base, BACKBONES[name].blocks)
    assert len(blocks) == count
    assert blocks[0][0] == first and blocks[-1][0] == last
    assert_blocks_cover_every_layer_once(base, blocks)
    assert_unfreeze_top_1_unfreezes_only_the_top_block(base, blocks)


def assert_blocks_cover_every_layer_once(base, blocks):
    in_blocks = [layer.name for _, layers in blocks for layer in layers]
    # the layers before the first block are the models' own fixed input scaling
    with_weights = [layer.name for layer in base.layers if layer.weights and not layer.name.startswith(
        ("normalization", "rescaling"))]
    assert sorted(in_blocks) == sorted(with_weights)


def assert_unfreeze_top_1_unfreezes_only_the_top_block(base, blocks):
    from transferkit.pieces.freezing import freeze_all_but_top

    freeze_all_but_top(base, blocks, 1)
    top = {id(w) for layer in blocks[-1][1] if not isinstance(layer, keras.layers.BatchNormalization)
           for w in layer.trainable_weights}
    assert base.trainable_weights and {id(w) for w in base.trainable_weights} == top


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_every_registry_entry_covers_its_layers_and_unfreezes_its_top_block(name):
    base = build_backbone(name, "none", (32, 32, 3))
    blocks = blocks_of(base, BACKBONES[name].blocks)
    assert len(blocks) >= 3
    assert_blocks_cover_every_layer_once(base, blocks)
    assert_unfreeze_top_1_unfreezes_only_the_top_block(base, blocks)


@pytest.mark.parametrize("mode, module", [
    ("tf", keras.applications.mobilenet_v2),
    ("caffe", keras.applications.resnet50),
    ("torch", keras.applications.densenet),
])
def test_preprocessing_matches_keras_applications(mode, module):
    x = np.random.default_rng(0).uniform(0, 255, (2, 4, 4, 3)).astype("float32")
    expected = module.preprocess_input(x.copy())
    got = keras.ops.convert_to_numpy(ImagenetPreprocess(mode)(x))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)


def test_preprocess_layer_round_trips(tmp_path):
    layer = ImagenetPreprocess("caffe")
    assert_config_round_trip(layer)
    model = keras.Sequential([keras.Input((4, 4, 3)), layer])
    assert_reloads_with_same_outputs(model, np.ones((1, 4, 4, 3), "float32") * 100, tmp_path)


def test_rgb_to_gray_is_itu_r_bt601_luma(tmp_path):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype("uint8")
    r, g, b = (pixels[..., c].astype("float64") for c in range(3))
    luma = 0.299 * r + 0.587 * g + 0.114 * b   # ITU-R BT.601
    got = keras.ops.convert_to_numpy(RgbToGray()(pixels.astype("float32")))
    assert got.shape == (2, 5, 7, 1)
    np.testing.assert_allclose(got[..., 0], luma, atol=1e-4)
    # Pillow's convert("L") (how transferkit reads RGB files as gray) is the same formula, rounded to integers
    pillow = np.stack([np.asarray(Image.fromarray(p).convert("L")) for p in pixels]).astype("float64")
    assert np.abs(pillow - luma).max() <= 0.5 + 1e-3
    for pure, weight in zip(np.eye(3) * 255, (0.299, 0.587, 0.114)):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(RgbToGray()(pure[None, None, None])), 255 * weight,
                                   rtol=1e-6)
    assert_config_round_trip(RgbToGray())
    model = keras.Sequential([keras.Input((5, 7, 3)), RgbToGray()])
    assert_reloads_with_same_outputs(model, pixels.astype("float32"), tmp_path)
    with pytest.raises(ValueError, match="3 channels"):
        RgbToGray()(np.ones((1, 2, 2, 4), "float32"))


@pytest.mark.parametrize("preprocessing", ["resizing", "a layer that resizes inside"])
def test_a_call_without_training_runs_batchnorm_after_resizing_in_inference_mode(preprocessing, tmp_path):

    class ResizesInside(keras.layers.Layer):  # as a keras-hub ImageConverter does
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.resizing = keras.layers.Resizing(6, 6)

        def call(self, x):
            return self.resizing(x)

    inputs = keras.Input((4, 4, 2))
    if preprocessing == "resizing":
        x = to_pixels(inputs, (0.0, 255.0), (6, 6), 2)   # Resizing's `training` defaults to True
    else:
        x = ResizesInside()(InferenceByDefault()(inputs))
    batchnorm = keras.layers.BatchNormalization(momentum=0.0)
    model = keras.Model(inputs, batchnorm(x))
    x = np.random.default_rng(0).normal(3, 2, (8, 4, 4, 2)).astype("float32")
    np.testing.assert_array_equal(model(x), model(x, training=False))
    np.testing.assert_array_equal(batchnorm.moving_mean, 0)   # not updated: both calls ran in inference mode
    model(x, training=True)   # as fit calls it: training, the statistics move
    assert np.all(keras.ops.convert_to_numpy(batchnorm.moving_mean) > 1)
    assert_config_round_trip(InferenceByDefault())


def test_backbone_from_a_weights_file_fine_tunes_top_block_with_batchnorm_frozen(tmp_path):
    base = build_backbone("mobilenetv2", "none", (32, 32, 3))
    # BatchNorm statistics from the digits as the classifier feeds them (pixels in [-1, 1]): with the initial
    # statistics a random MobileNetV2's features are the same for every input, and a head that starts at zero
    # sends the base no gradient to speak of
    data = tk.load_data("digits")
    digits = keras.Input(data.input_shape)
    pixels = keras.Model(digits, to_pixels(digits, data.value_range, (32, 32), 3) / 127.5 - 1.0)(data.x[:256])
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.0
    base(pixels, training=True)
    for layer in norms:
        layer.momentum = 0.999
    weights = tmp_path / "mobilenetv2.weights.h5"
    base.save_weights(weights)
    saved = {w.path: keras.ops.convert_to_numpy(w) for w in base.weights}
    result = tk.finetune(backbone="mobilenetv2", weights=str(weights), label_fraction=0.05, head_epochs=1, epochs=1,
                         unfreeze_top=1, batch_size=32, out=str(tmp_path / "clf"), verbose=False)
    model = result.model
    assert model.input.shape[1:] == (8, 8, 1)   # gray 8x8 digits in, resized and expanded inside
    finetuned = model.get_layer("mobilenetv2_1.00_32")
    top = {layer.name for layer in blocks_of(finetuned, BACKBONES["mobilenetv2"].blocks)[-1][1]}
    for layer in finetuned.layers:
        for w in layer.weights:
            now = keras.ops.convert_to_numpy(w)
            if layer.name in top and not isinstance(layer, keras.layers.BatchNormalization):
                assert not np.array_equal(now, saved[w.path]), w.path
            else:
                np.testing.assert_array_equal(now, saved[w.path], err_msg=w.path)
