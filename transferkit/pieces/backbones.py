"""Bases to fine-tune: Keras Applications backbones (a registry), saved encoders and any Keras model.

Each registry entry says how to build the backbone, what preprocessing its
weights expect, its minimum input size, and how its layers group into blocks,
top to bottom, so that `unfreeze_top=N` means the same thing everywhere.
`backbone_base` puts a registry backbone on raw images; `base_inputs`,
`base_blocks` and `with_dtype_policy` do the same for any other model (a saved
encoder, a model file): what it takes, its blocks, its computing precision.

Example:

>>> from transferkit.pieces.backbones import BACKBONES
>>> BACKBONES["mobilenetv2"].preprocess, BACKBONES["mobilenetv2"].min_size
('tf', 32)
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import keras

from transferkit.errors import SettingsError, TransferkitError
from transferkit.pieces.colors import LUMA

Blocks = list[tuple[str, list[keras.layers.Layer]]]


@dataclasses.dataclass(frozen=True)
class Backbone:
    """One Keras Applications architecture.

    Attributes:
        constructor: the name of the function in `keras.applications`.
        preprocess: what the ImageNet weights expect of 0..255 RGB inputs:
            `"tf"` (scale to [-1, 1]), `"torch"` (scale to [0, 1], standardize per
            channel), `"caffe"` (BGR, subtract the channel means) or `"none"`
            (the model preprocesses inside).
        min_size: the smallest input side the architecture accepts.
        default_size: the side its ImageNet weights were trained at.
        blocks: regular expressions whose first group names a layer's block; a
            layer that matches none belongs to the block of the layer before it.
            Every block has weights that train when it is unfrozen.
    """

    constructor: str
    preprocess: str
    min_size: int = 32
    default_size: int = 224
    blocks: tuple[str, ...] = ()


_MOBILENETV2 = (r"^(?:bn_)?(Conv1)", r"^(expanded_conv)_", r"^(block_\d+)_", r"^(Conv_1)(?:_bn)?$")
_MOBILENETV3 = (r"^(conv)(?:_bn)?$", r"^(expanded_conv(?:_\d+)?)_", r"^(conv_1)(?:_bn)?$")
_EFFICIENTNET = (r"^(stem)_", r"^(block\d)[a-z]_", r"^(top)_")
# a final BatchNorm alone (ResNetV2's post_bn, DenseNet's bn) joins the last block: frozen BatchNorm
# would leave a block of its own with nothing to train
_RESNET = (r"^(conv1)_", r"^(conv\d_block\d+)_")
_DENSENET = (r"^(conv1)_", r"^(conv\d_block\d+)_", r"^(pool\d)_")
_VGG = (r"^(block\d)_",)
_CONVNEXT = (r"^convnext_[a-z]+_(stem)", r"^convnext_[a-z]+_(stage_\d+_block_\d+)_",
             r"^convnext_[a-z]+_(downsampling_block_\d+)",
             r"^(layer_normalization)(?:_\d+)?$")  # its final norm is named by Keras's session-wide counter


def _family(names: dict[str, str], preprocess: str, blocks: tuple[str, ...]) -> dict[str, Backbone]:
    return {key: Backbone(constructor, preprocess, blocks=blocks) for key, constructor in names.items()}


BACKBONES: dict[str, Backbone] = {
    **_family({"mobilenetv2": "MobileNetV2"}, "tf", _MOBILENETV2),
    **_family({"mobilenetv3small": "MobileNetV3Small", "mobilenetv3large": "MobileNetV3Large"}, "none",
              _MOBILENETV3),
    **_family({f"efficientnetb{i}": f"EfficientNetB{i}" for i in range(8)}, "none", _EFFICIENTNET),
    **_family({f"efficientnetv2{v.lower()}": f"EfficientNetV2{v}" for v in ("B0", "B1", "B2", "B3", "S", "M", "L")},
              "none", _EFFICIENTNET),
    **_family({f"resnet{d}": f"ResNet{d}" for d in (50, 101, 152)}, "caffe", _RESNET),
    **_family({f"resnet{d}v2": f"ResNet{d}V2" for d in (50, 101, 152)}, "tf", _RESNET),
    **_family({f"densenet{d}": f"DenseNet{d}" for d in (121, 169, 201)}, "torch", _DENSENET),
    **_family({"vgg16": "VGG16", "vgg19": "VGG19"}, "caffe", _VGG),
    **_family({f"convnext{size}": f"ConvNeXt{size.capitalize()}" for size in ("tiny", "small", "base", "large")},
              "none", _CONVNEXT),
}

ENCODER_BLOCK = r"^(?:encoder_)?(block\d+)_"

_IMAGENET_TORCH = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
_IMAGENET_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)


def get_backbone(name: str) -> Backbone:
    try:
        return BACKBONES[name]
    except KeyError:
        raise SettingsError(
            f"Unknown backbone {name!r}; expected one of {', '.join(sorted(BACKBONES))}."
        ) from None


def backbone_named(model_name: str) -> Backbone | None:
    """The registry entry a Keras Applications model's name starts with (`mobilenetv2_1.00_224`), or None."""
    name = model_name.replace("_", "").replace("-", "").lower()
    for key in sorted(BACKBONES, key=len, reverse=True):  # mobilenetv2 before a shorter name it starts with
        if name.startswith(key):
            return BACKBONES[key]
    return None


def build_backbone(name: str, weights: str, input_shape: tuple[int, int, int]) -> keras.Model:
    """The application without its top, with `weights` `"imagenet"`, `"none"` or a file path."""
    entry = get_backbone(name)
    constructor = getattr(keras.applications, entry.constructor)
    if weights not in ("imagenet", "none") and not Path(weights).is_file():
        raise SettingsError(f"Weights file {weights!r} does not exist; expected imagenet, none or a file path.")
    try:
        return constructor(include_top=False, weights=None if weights == "none" else weights,
                           input_shape=input_shape)
    except Exception as err:
        if weights == "imagenet" and looks_like_download_failure(err):
            raise TransferkitError(
                f"Could not download the ImageNet weights of {name} (no network?); "
                f"download them on a machine with network and pass the file with --weights PATH."
            ) from None
        if weights not in ("imagenet", "none"):
            raise SettingsError(
                f"Weights file {weights!r} does not fit {name} at input {input_shape}: {str(err).splitlines()[0]}"
            ) from None
        raise


def looks_like_download_failure(err: Exception) -> bool:
    """Whether `err`, raised while fetching pretrained weights, says the download failed (no network)."""
    text = f"{type(err).__name__} {err}".lower()
    return any(s in text for s in ("url", "fetch", "download", "connection", "resolve", "network", "http"))


def blocks_of(base: keras.Model, patterns: tuple[str, ...] | None = None) -> Blocks:
    """The base's blocks, bottom to top, as `(block_name, layers)`.

    `patterns` are the registry's block expressions; `None` means a transferkit
    encoder, whose blocks are named `block{i}_...` (one Dense or Conv layer with
    the normalization, activation, pooling and dropout after it). Layers before
    the first block (the input, normalization) belong to no block and never train.
    """
    patterns = patterns or (ENCODER_BLOCK,)
    blocks: dict[str, list[keras.layers.Layer]] = {}
    current = None
    for layer in base.layers:
        for pattern in patterns:
            match = re.match(pattern, layer.name)
            if match:
                current = match.group(1)
                break
        if current is not None and layer.weights:
            blocks.setdefault(current, []).append(layer)
    return list(blocks.items())


# a model's layers named by stage (`block1_conv`, `stage2_...`, `conv3_...`)
NAMED_STAGES = (r"^(block_?\d+)(?:_|$)", r"^(stage_?\d+)(?:_|$)", r"^(conv\d+)_")
# layers that join the block of the layer with weights before them
FOLLOWERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization, keras.layers.GroupNormalization,
             keras.layers.PReLU)


def base_blocks(base: keras.Model) -> tuple[str, Blocks]:
    """The blocks of any Keras model, bottom to top, and the rule that found them, the first that applies.

    1. `"keras applications"`: a Keras Applications model (known by its name,
       `mobilenetv2_1.00_224`): the registry's blocks, as for a backbone;
    2. `"named stages"`: layers named by stage (`NAMED_STAGES`) from the first
       layer with weights on, in two stages or more: those stages;
    3. `"weighted layers"`: each layer with trainable weights starts a block, which
       the normalization and PReLU layers after it join (a convolution with its BatchNorm).
    """
    entry = backbone_named(base.name)
    if entry is not None:
        return "keras applications", blocks_of(base, entry.blocks)
    weighted = [layer for layer in base.layers if any(w.trainable for w in layer.weights)]
    staged = blocks_of(base, NAMED_STAGES)
    if weighted and any(re.match(p, weighted[0].name) for p in NAMED_STAGES) and len(staged) >= 2:
        return "named stages", staged
    blocks: dict[str, list[keras.layers.Layer]] = {}
    current = None
    for layer in base.layers:
        if any(w.trainable for w in layer.weights) and not isinstance(layer, FOLLOWERS):
            current = layer.name
        if current is not None and layer.weights:
            blocks.setdefault(current, []).append(layer)
    return "weighted layers", list(blocks.items())


def with_dtype_policy(model: keras.Model, policy: str) -> keras.Model:
    """`model` as it was saved, or a copy with its weights whose layers compute under `policy` (mixed precision)."""
    if policy == "float32":
        return model

    def clone(layer):
        return layer.__class__.from_config({**layer.get_config(), "dtype": policy})

    copy = keras.models.clone_model(model, clone_function=clone)
    copy.set_weights(model.get_weights())
    return copy


def saved_base(x, value_range: tuple[float, float], model: keras.Model, precision: str, preprocess: str | None = None):
    """A saved model as the base on the images `x`, computing under `precision`.

    `preprocess` None: a transferkit encoder, which takes the inputs as they are
    and names its blocks (`blocks_of`); else a model file's body, through
    `base_inputs` with `preprocess`, its blocks by `base_blocks`. Returns its
    outputs, the base (a copy under a mixed `precision`), its blocks and the
    rule that found them (None for an encoder).
    """
    base = with_dtype_policy(model, precision)
    if preprocess is None:
        return base(x), base, blocks_of(base), None
    outputs = base(base_inputs(x, value_range, base, preprocess))
    rule, blocks = base_blocks(base)
    return outputs, base, blocks, rule


def backbone_base(x, value_range: tuple[float, float], name: str, weights: str = "none",
                  image_size: int | None = None):
    """The registry's backbone `name` on the raw images `x`.

    Returns its outputs, the backbone, its blocks and what a manifest records of it
    (`kind`, `description`, the input side and preprocessing).
    """
    entry = get_backbone(name)
    if len(x.shape) != 4:
        raise SettingsError(f"Backbone {name!r} takes images; the data's inputs have shape {tuple(x.shape[1:])}.")
    side = backbone_input_size(entry, *x.shape[1:3], image_size)
    pixels = image_adapter(x, value_range, side, entry.preprocess)
    base = build_backbone(name, weights, (side, side, 3))
    outputs = base(pixels)
    info = {"backbone": name, "weights": weights, "input_side": side, "preprocess": entry.preprocess,
            "kind": "backbone", "description": f"{name} (weights {weights}) at {side}x{side}"}
    return outputs, base, blocks_of(base, entry.blocks), info


def backbone_input_size(entry: Backbone, height: int, width: int, image_size: int | None) -> int:
    """The square side the backbone sees: `image_size`, else the input's, at least `min_size`."""
    side = image_size or max(height, width)
    return max(side, entry.min_size)


@keras.saving.register_keras_serializable(package="transferkit")
class ImagenetPreprocess(keras.layers.Layer):
    """Turn 0..255 RGB images into what ImageNet weights expect.

    Example:

    >>> import numpy as np
    >>> ImagenetPreprocess("tf")(np.full((1, 2, 2, 3), 255.0)).numpy().max()
    1.0

    Args:
        mode: String. `"tf"`, `"torch"`, `"caffe"` or `"none"` (see `Backbone.preprocess`).
    """

    MODES = ("tf", "torch", "caffe", "none")

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"mode must be one of {', '.join(self.MODES)}. Received: mode={mode!r}")
        self.mode = mode

    def call(self, x):
        ops = keras.ops
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "torch":
            mean, std = (ops.convert_to_tensor(v, dtype=x.dtype) for v in _IMAGENET_TORCH)
            return (x / 255.0 - mean) / std
        if self.mode == "caffe":
            return ops.flip(x, axis=-1) - ops.convert_to_tensor(_IMAGENET_CAFFE_BGR_MEAN, dtype=x.dtype)
        return x

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def image_adapter(x, value_range: tuple[float, float], side: int, mode: str):
    """Layers from the user's raw images to the backbone's input: 0..255 RGB, resized, preprocessed."""
    if x.shape[-1] not in (1, 3):
        raise SettingsError(f"Backbones take 1 or 3 channels; the data has {x.shape[-1]}.")
    return ImagenetPreprocess(mode, name="imagenet_preprocess")(to_pixels(x, value_range, (side, side), 3))


def to_pixels(x, value_range: tuple[float, float], size: tuple[int, int], channels: int):
    """Layers from the user's raw images to 0..255 pixels with `channels` channels at `size`.

    Gray images are repeated into R, G and B for a 3-channel base; RGB images
    are made gray for a 1-channel base by ITU-R BT.601 luma (`RgbToGray`), the
    rule `transferkit.data.images` reads RGB files as gray by.
    """
    lo, hi = value_range
    scale = 255.0 / (hi - lo) if hi > lo else 1.0
    x = keras.layers.Rescaling(scale, offset=-lo * scale, name="to_0_255")(x)
    if x.shape[-1] == 1 and channels == 3:
        x = keras.layers.Concatenate(name="gray_to_rgb")([x, x, x])
    elif x.shape[-1] == 3 and channels == 1:
        x = RgbToGray(name="rgb_to_gray")(x)
    elif x.shape[-1] != channels:
        raise SettingsError(f"The base takes images of {channels} channel(s); the data has {x.shape[-1]} "
                            f"(expected as many, or 1 or 3: gray is made RGB, RGB gray).")
    if (x.shape[1], x.shape[2]) != tuple(size):
        # `training=False` is recorded with the call: Resizing's default, True, would be passed on to the layers
        # after it when the model is called without `training` (PITFALLS 1); `fit` still passes True
        x = keras.layers.Resizing(*size, name="resize")(x, training=False)
    return x


# a model's `preprocess`: 0..255 pixels → what its weights expect
PREPROCESS = {
    "none": lambda: None,
    "scale:1/255": lambda: keras.layers.Rescaling(1 / 255, name="preprocess"),
    "tf": lambda: keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="preprocess"),
    "imagenet-caffe": lambda: ImagenetPreprocess("caffe", name="preprocess"),
    "imagenet-torch": lambda: ImagenetPreprocess("torch", name="preprocess"),
}


def base_inputs(x, value_range: tuple[float, float], base: keras.Model, preprocess: str):
    """Layers from the user's raw images to what `base` takes: its size and channels, `preprocess`ed."""
    if len(x.shape) != 4:
        raise SettingsError(f"--base takes images; the data's inputs have shape {tuple(x.shape[1:])}, expected "
                            f"(height, width, channels).")
    height, width, channels = base.inputs[0].shape[1:]
    pixels = to_pixels(x, value_range, (height or x.shape[1], width or x.shape[2]), channels or x.shape[-1])
    if preprocess.startswith("imagenet") and pixels.shape[-1] != 3:
        raise SettingsError(f"--preprocess {preprocess} is for RGB images; the base takes "
                            f"{pixels.shape[-1]} channel(s): expected none, scale:1/255 or tf.")
    layer = PREPROCESS[preprocess]()
    return pixels if layer is None else layer(pixels)


@keras.saving.register_keras_serializable(package="transferkit")
class RgbToGray(keras.layers.Layer):
    """RGB images to one gray channel by ITU-R BT.601 luma: `0.299 R + 0.587 G + 0.114 B`.

    The weights of Pillow's `convert("L")` (which rounds to integers) and of
    `tf.image.rgb_to_grayscale` (to four digits), on any value range.

    Example:

    >>> import numpy as np
    >>> RgbToGray()(np.array([[[[100.0, 200.0, 50.0]]]], "float32")).numpy().ravel()
    array([153.], dtype=float32)
    """

    def build(self, input_shape):
        if input_shape[-1] != 3:
            raise ValueError(f"RgbToGray takes images with 3 channels (R, G, B). Received: "
                             f"input_shape={tuple(input_shape)}")

    def call(self, x):
        weights = keras.ops.convert_to_tensor(LUMA, dtype=x.dtype)
        return keras.ops.sum(x * weights, axis=-1, keepdims=True)

    def compute_output_shape(self, input_shape):
        return (*input_shape[:-1], 1)


@keras.saving.register_keras_serializable(package="transferkit")
class InferenceByDefault(keras.layers.Layer):
    """The identity, making a call that does not say `training` run the layers after it in inference mode.

    A Keras layer passes the `training` it runs with to the layers called after
    it in the same call. Keras's image preprocessing layers default it to True,
    so a layer that calls one inside (a keras-hub `ImageConverter` calls
    `Resizing`) would make `model(x)` run a trainable BatchNorm after it on the
    batch's statistics, and update them (PITFALLS 1). Placed before such a
    layer, this one says False first; `fit` still passes True.

    Example:

    >>> import numpy as np
    >>> InferenceByDefault()(np.ones((1, 2), "float32")).numpy()
    array([[1., 1.]], dtype=float32)
    """

    def call(self, x, training=False):
        return x

    def compute_output_shape(self, input_shape):
        return input_shape
