"""keras-hub backbones as the base (`--backbone hub:PRESET` or `hub:DIR`): the preset, its image converter, blocks.

`hub:PRESET` is anything `keras_hub.models.Backbone.from_preset` takes: a
built-in preset (`hub:resnet_50_imagenet`), a handle
(`hub:kaggle://keras/resnetv2/keras/resnet50_v2_imagenet`, `hub:hf://...`) or a
folder written by `save_to_preset` (`hub:./my_preset`). It needs keras-hub
(`pip install 'transferkit[hub]'`), imported only here, when such a base is built.

Inputs: the data's images reach the backbone as 0..255 pixels (gray made RGB
for a 3-channel backbone, RGB made gray by ITU-R BT.601 luma for a 1-channel
one), then through the preset's image converter
(`keras_hub.layers.ImageConverter.from_preset`: its resizing, scale and offset),
all inside the classifier, so the classifier and its export take raw images.
The side the backbone sees: a backbone's fixed input size, else `--image-size`,
else the converter's image size, else the data's. A preset without a converter
gets the 0..255 pixels, with a warning. A backbone that outputs tokens
(batch, tokens, features: ViT, DINOv2) is followed by their mean.

Blocks, for `--unfreeze-top`, bottom to top, by the first rule that applies:

1. a backbone with a feature pyramid (keras-hub's `FeaturePyramidBackbone`:
   ResNet, CSPNet, DenseNet, EfficientNet, MiT, DINOv2, ...): one block per
   pyramid level (`P2`, `P3`, ...), lowest first. A level's block holds the
   layers with weights that compute it and no level below it, so the stem joins
   the first level; layers after the top level (a final norm) join the top block.
   Blocks are whole Keras layers: a level computed inside a layer that computes
   several adds no block of its own (DINOv2: `stem`, then its whole encoder).
2. else the rule of `--base FILE` (`transferkit.pieces.backbones.base_blocks`): the
   layers' named stages, else each layer with weights and the normalization after it.

The manifest records the preset, the backbone's class, the converter, the input
size, the rule and `requires: keras_hub`, which `transferkit.load_model` imports
before loading (Keras itself imports keras-hub's classes by their module).

Example:

>>> import transferkit as tk
>>> tk.finetune(data="dir:photos", backbone="hub:resnet_18_imagenet", unfreeze_top=1)   # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path
from typing import Any

import keras

from transferkit.pieces.backbones import (Blocks, InferenceByDefault, base_blocks, blocks_of,
                                         looks_like_download_failure, to_pixels)
from transferkit.finetuning.bases import layer_table
from transferkit.errors import SettingsError, TransferkitError

PREFIX = "hub:"
INSTALL = "pip install 'transferkit[hub]'"


def is_hub(backbone: str | None) -> bool:
    """Whether `--backbone` names a keras-hub preset (`hub:...`)."""
    return bool(backbone) and backbone.startswith(PREFIX)


def import_keras_hub(why: str):
    """The `keras_hub` module; a `SettingsError` saying how to install it when it is missing."""
    try:
        import keras_hub
    except ModuleNotFoundError as err:
        if err.name != "keras_hub":
            raise
        raise SettingsError(
            f"{why} needs keras-hub, which is not installed; expected it installed: {INSTALL}") from None
    return keras_hub


@dataclasses.dataclass(frozen=True)
class HubBackbone:
    """A keras-hub backbone, where it came from (`preset`, as keras-hub takes it), and the module."""

    model: keras.Model
    name: str
    preset: str
    keras_hub: Any


def load_backbone(name: str, dtype: str | None = None) -> HubBackbone:
    """The backbone of `name` (`hub:PRESET` or `hub:DIR`), with its weights, computing under `dtype`.

    Raises:
        SettingsError: keras-hub is missing, `name` is no preset, or not an image backbone.
        TransferkitError: the preset could not be downloaded.
    """
    keras_hub = import_keras_hub(f"--backbone {name!r}")
    preset = name[len(PREFIX):]
    if not preset:
        raise SettingsError(f"--backbone {name!r} names no preset; expected hub:PRESET (a keras-hub preset or "
                            f"handle) or hub:DIR (a folder written by save_to_preset).")
    folder = Path(preset).expanduser()
    if folder.is_dir():
        preset = str(folder.resolve())
    try:
        kwargs = {} if dtype in (None, "float32") else {"dtype": dtype}
        model = keras_hub.models.Backbone.from_preset(preset, **kwargs)
    except Exception as err:
        raise _preset_error(name, err) from None
    inputs = model.inputs if isinstance(model.inputs, list) else []
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = ", ".join(str(tuple(x.shape[1:])) for x in inputs) or "several named inputs"
        raise SettingsError(f"--backbone {name!r} is a {type(model).__name__}, which takes {shapes}; expected an "
                            f"image backbone (one input: height, width, channels).")
    return HubBackbone(model, name, preset, keras_hub)


def _preset_error(name: str, err: Exception) -> Exception:
    reason = str(err).strip().splitlines()[0].rstrip(":") if str(err).strip() else type(err).__name__
    if looks_like_download_failure(err):
        return TransferkitError(
            f"Could not download the keras-hub preset of --backbone {name!r} (no network? {type(err).__name__}); "
            f"save it on a machine with network (keras_hub.models.Backbone.from_preset(...).save_to_preset(DIR), "
            f"and the ImageConverter likewise) and pass --backbone hub:DIR.")
    return SettingsError(f"--backbone {name!r} is not a keras-hub backbone preset that loads ({reason}); expected "
                         f"a preset name (keras_hub.models.Backbone.presets), a kaggle:// or hf:// handle, or a "
                         f"folder written by save_to_preset.")


def load_converter(hub: HubBackbone, size: tuple[int, int] | None):
    """The preset's image converter, resizing to `size` (None: its own), or None when the preset has none."""
    kwargs = {} if size is None else {"image_size": tuple(size)}
    try:
        return hub.keras_hub.layers.ImageConverter.from_preset(hub.preset, **kwargs)
    except FileNotFoundError:
        return None
    except Exception as err:
        raise _preset_error(hub.name, err) from None


def hub_blocks(base: keras.Model) -> tuple[str, Blocks]:
    """The rule that applies to the keras-hub backbone `base` (see the module's docstring) and its blocks."""
    levels = dict(getattr(base, "pyramid_outputs", None) or {})
    if levels:
        blocks = _pyramid_blocks(base, levels)
        if len(blocks) >= 2:
            return "pyramid levels", blocks
    return base_blocks(base)


def _pyramid_blocks(base: keras.Model, levels: dict[str, Any]) -> Blocks:
    computes = {level: keras.Model(base.inputs, tensor).layers for level, tensor in levels.items()}
    order = sorted(levels, key=lambda level: len(computes[level]))  # a level computes those below it too
    block_of: dict[int, str] = {}
    for level in order:
        for layer in computes[level]:
            block_of.setdefault(id(layer), level)
    blocks: dict[str, list[keras.layers.Layer]] = {level: [] for level in order}
    after = [layer for layer in base.layers if layer.weights and id(layer) not in block_of]
    for layer in base.layers:
        if layer.weights and id(layer) in block_of:
            blocks[block_of[id(layer)]].append(layer)
    found = [(level, layers) for level, layers in blocks.items() if layers]
    if found:
        found[-1][1].extend(after)  # layers after the top level (a final norm) join the top block
    return found


def hub_base(x, value_range: tuple[float, float], name: str, image_size: int | None, weights: str = "none",
             precision: str = "float32"):
    """Build the keras-hub base on the raw images `x`: returns `(outputs, base, blocks, manifest record)`."""
    if weights != "none":
        raise SettingsError(f"--weights {weights} goes with a Keras Applications backbone; --backbone {name!r} "
                            f"brings the preset's weights: expected no --weights.")
    if len(x.shape) != 4:
        raise SettingsError(f"--backbone {name!r} takes images; the data's inputs have shape {tuple(x.shape[1:])}, "
                            f"expected (height, width, channels).")
    hub = load_backbone(name, precision)
    base = hub.model
    height, width, channels = base.inputs[0].shape[1:]
    wanted = (height, width) if height and width else (image_size, image_size) if image_size else None
    converter = load_converter(hub, wanted)
    size = tuple(wanted or (converter.image_size if converter is not None else None) or x.shape[1:3])
    record = describe(hub, converter, (*size, channels or 3))
    rule, blocks = hub_blocks(base)
    pixels = to_pixels(x, value_range, size if converter is None else tuple(x.shape[1:3]), channels or 3)
    if converter is None:
        print(f"warning: the preset of --backbone {name!r} has no image converter: the backbone gets 0..255 "
              f"pixels", file=sys.stderr, flush=True)
        inputs = pixels
    else:  # InferenceByDefault: the converter's Resizing would switch the backbone's BatchNorm to training
        inputs = converter(InferenceByDefault(name="inference_by_default")(pixels))
    named = base.input if isinstance(base.input, dict) else None  # DINOv2 takes {"images": ...}
    outputs = base({key: inputs for key in named} if named else inputs)
    if len(outputs.shape) == 3:  # tokens (a ViT's, DINOv2's): their mean, rather than every token flattened
        outputs = keras.layers.GlobalAveragePooling1D(name="token_pool")(outputs)
    return outputs, base, blocks, {**record, "blocks_rule": rule}


def describe(hub: HubBackbone, converter, input_size: tuple[int, int, int]) -> dict[str, Any]:
    """What the manifest records of a keras-hub base, and what loading the artifact needs (`requires`)."""
    weights = Path(hub.preset) / "model.weights.h5"
    record = {
        "kind": "hub", "backbone": hub.name, "preset": hub.preset, "class": type(hub.model).__name__,
        "model": hub.model.name, "input_size": [int(d) for d in input_size],
        "image_converter": None if converter is None else {
            "class": type(converter).__name__, "image_size": list(converter.image_size or []) or None,
            "scale": converter.scale, "offset": converter.offset},
        "requires": [{"module": "keras_hub", "version": hub.keras_hub.__version__, "install": INSTALL}],
        "description": f"keras-hub {type(hub.model).__name__} {hub.name} at {input_size[0]}x{input_size[1]}",
    }
    if weights.is_file():
        record["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    return record


def inspect_backbone(name: str, verbose: bool = True) -> str:
    """Print and return a backbone's layers with their blocks: a keras-hub `hub:...` one or a registry name."""
    if is_hub(name):
        base = load_backbone(name).model
        rule, blocks = hub_blocks(base)
    else:
        from transferkit.pieces.backbones import BACKBONES, build_backbone, get_backbone

        entry = get_backbone(name)
        base = build_backbone(name, "none", (entry.default_size, entry.default_size, 3))
        rule, blocks = "keras applications", blocks_of(base, BACKBONES[name].blocks)
    size = "x".join(str(d) for d in base.inputs[0].shape[1:])
    text = "\n".join([f"{name}: {type(base).__name__} {base.name}, input {size}, {len(blocks)} blocks by {rule}",
                      *layer_table(base, blocks)])
    if verbose:
        print(text, flush=True)
    return text


def restore_freeze(model: keras.Model, stages: list[dict[str, Any]], recipe: str | Path) -> None:
    """Freeze a reloaded classifier's keras-hub base as its last training stage left it.

    keras-hub rebuilds a backbone from its arguments, so the `trainable` flags of
    its layers are not saved with the model: every layer would load trainable.
    `stages` are the manifest's (the last one's `unfreeze_top` counts); `recipe` is the
    artifact's recipe file, whose `train_batchnorm` applies if it is there.
    """
    from transferkit.pieces.freezing import find_base, freeze_all_but_top
    from transferkit.recipe import Recipe

    recipe = Path(recipe)
    train_batchnorm = recipe.is_file() and Recipe.load(recipe).train_batchnorm
    base = find_base(model)
    freeze_all_but_top(base, hub_blocks(base)[1], int(stages[-1].get("unfreeze_top", 0)), train_batchnorm)
