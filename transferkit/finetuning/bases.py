"""Any saved Keras model as the base to fine-tune (`--base FILE`): where its body ends, its blocks, its inputs.

The body is the model from its input to the end of the `cut` layer, which it
keeps: `cut` is a layer's name or a negative index into `model.layers`
(`-1`: the whole model, `-2`: all but the last layer). By default, as fastai's
`create_body`, the classifier is dropped: everything after the last
GlobalAveragePooling2D, GlobalMaxPooling2D or Flatten layer, or, in a model
without one, the last Dense layer and what follows it.

Blocks, for `unfreeze_top`, bottom to top, by the first rule that applies
(`transferkit.pieces.backbones.base_blocks`, with the input adapter `base_inputs`: both
in `saved_base`):

1. a Keras Applications model (known by its name, `mobilenetv2_1.00_224`):
   the registry's blocks, as for `--backbone`;
2. a model whose layers are named by stage (`block1_conv`, `stage2_...`,
   `conv3_...`) from its first layer with weights on, in two stages or more:
   those stages;
3. else each layer with trainable weights starts a block, which the
   normalization and PReLU layers after it join (a convolution with its BatchNorm).

Layers before the first block belong to none and never train. The data's
images reach the base as 0..255 pixels at its input size (gray ones made RGB
for a 3-channel base; RGB ones made gray for a 1-channel base by ITU-R BT.601
luma, `0.299 R + 0.587 G + 0.114 B`, as `transferkit.data.images` reads RGB files as
gray), then `preprocess` maps them to the range its weights expect, inside the
classifier, so the classifier and its export take raw pixels.

Example:

>>> body = load_body("emotion_model.hdf5", cut="add_4")        # doctest: +SKIP
>>> body.cut, base_blocks(body.model)[0]                      # doctest: +SKIP
('add_4', 'weighted layers')
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from pathlib import Path
from typing import Any

import keras

from transferkit.pieces.backbones import Blocks, base_blocks
from transferkit.errors import SettingsError

POOLING = (keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D, keras.layers.Flatten)


@dataclasses.dataclass(frozen=True)
class Body:
    """A saved model up to its cut: the model, the file, the layer it ends with and how that was chosen."""

    model: keras.Model
    file: str
    cut: str
    cut_rule: str


def file_body(path: str | Path, cut: str | int | None, preprocess: str | None) -> tuple[keras.Model, dict[str, Any]]:
    """`--base FILE`: its body (up to `cut`) and what the manifest records of it (`describe`; `preprocess`
    None is "none"). `transferkit.pieces.backbones.saved_base` puts it on the images, with its blocks."""
    body = load_body(path, cut)
    return body.model, describe(body, preprocess or "none")


def load_body(path: str | Path, cut: str | int | None = None, model: keras.Model | None = None) -> Body:
    """The body of the Keras model file `path` (loaded already: `model`), ending with layer `cut`.

    `cut` defaults to the end of the body before the model's classifier (see the module's docstring).

    Raises:
        SettingsError: `path` is not a Keras model file, the model does not take one
            image input, or `cut` names no layer or leaves none.
    """
    model = model if model is not None else load_model_file(path)
    if cut is None:
        output, rule = default_cut(model), "default"
    else:
        output, rule = _layer(model, cut, path).output, "given"
    cut_layer = output._keras_history[0]
    if isinstance(cut_layer, keras.layers.InputLayer):
        raise SettingsError(f"--cut {cut if cut is not None else '(default)'} leaves no layers of {str(path)!r}; "
                            f"expected a layer after its input (transferkit inspect --base FILE lists them).")
    return Body(keras.Model(model.inputs[0], output, name=model.name), str(path), cut_layer.name, rule)


def load_model_file(path: str | Path) -> keras.Model:
    """A `.keras` or legacy `.h5` model, without its training configuration; one image input."""
    from transferkit.registration import register_keras_objects

    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"--base {str(path)!r} does not exist; expected a Keras model file (.keras or .h5).")
    register_keras_objects()
    try:
        model = keras.models.load_model(file, compile=False)
    except Exception as err:  # not a model file, a weights-only file, an unknown class
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SettingsError(f"--base {str(path)!r} is not a Keras model file that loads ({reason}); "
                            f"expected a .keras or .h5 model file.") from None
    inputs = getattr(model, "inputs", None) or []
    if len(inputs) != 1 or len(inputs[0].shape) != 4:
        shapes = ", ".join(str(tuple(x.shape[1:])) for x in inputs) or "none"
        raise SettingsError(f"--base {str(path)!r} takes inputs {shapes}; expected one image input "
                            f"(height, width, channels).")
    return model


def default_cut(model: keras.Model):
    """The body's output: that of the last pooling/flatten layer, else the input of the last Dense layer."""
    for layer in reversed(model.layers):
        if isinstance(layer, POOLING):
            return layer.output
    for layer in reversed(model.layers):
        if isinstance(layer, keras.layers.Dense):
            return layer.input
    return model.outputs[0]


def _layer(model: keras.Model, cut: str | int, path: str | Path) -> keras.layers.Layer:
    count = len(model.layers)
    if re.fullmatch(r"-\d+", str(cut)):
        index = int(cut)
        if -count <= index <= -1:
            return model.layers[index]
        raise SettingsError(f"--cut {index} is beyond the {count} layers of {str(path)!r}; "
                            f"expected a layer name or a negative index from -1 to -{count}.")
    for layer in model.layers:
        if layer.name == cut:
            return layer
    raise SettingsError(f"--cut {cut!r} is not a layer of {str(path)!r}; expected one of its {count} layers' "
                        f"names (transferkit inspect --base FILE lists them) or a negative index.")


def describe(body: Body, preprocess: str) -> dict[str, Any]:
    """What the manifest records of the base: the file (and its SHA-256), the cut, input, preprocessing."""
    size = [None if d is None else int(d) for d in body.model.inputs[0].shape[1:]]
    digest = hashlib.sha256(Path(body.file).read_bytes()).hexdigest()
    return {"kind": "file", "file": body.file, "sha256": digest, "model": body.model.name, "cut": body.cut,
            "cut_rule": body.cut_rule, "input_size": size, "preprocess": preprocess,
            "description": f"{Path(body.file).name} up to {body.cut} ({'x'.join(str(d) for d in size)}, "
                           f"preprocess {preprocess})"}


def inspect_base(path: str | Path, cut: str | int | None = None, verbose: bool = True) -> str:
    """Print and return a model file's layers as `--base` sees them: --cut index, output, block, or dropped.

    Example:

    >>> print(inspect_base("emotion_model.hdf5", cut="add_4", verbose=False))   # doctest: +SKIP
    emotion_model.hdf5: model_1, input 64x64x1, body up to add_4 (given), 14 blocks by weighted layers
    cut  layer       type        output        params  block
    -46  input_1     InputLayer  (64, 64, 1)   0       -
    ...
    """
    model = load_model_file(path)  # the whole model, to show what the cut drops
    body = load_body(path, cut, model)
    rule, blocks = base_blocks(body.model)
    size = "x".join(str(d) for d in model.inputs[0].shape[1:])
    text = "\n".join([
        f"{Path(path).name}: {model.name}, input {size}, body up to {body.cut} ({body.cut_rule}), "
        f"{len(blocks)} blocks by {rule}",
        *layer_table(model, blocks, kept={layer.name for layer in body.model.layers})])
    if verbose:
        print(text, flush=True)
    return text


def layer_table(model: keras.Model, blocks: Blocks, kept: set[str] | None = None) -> list[str]:
    """One aligned line per layer of `model`: type, output, parameters and block (`-`: none).

    With `kept` (the names a cut keeps), a first column gives each layer's `--cut`
    index and the block column says `(dropped)` of the layers the cut drops.
    """
    block_of = {layer.name: name for name, layers in blocks for layer in layers}
    rows = [("cut",) * (kept is not None) + ("layer", "type", "output", "params", "block")]
    for index, layer in enumerate(model.layers):
        shape = tuple(layer.output.shape[1:]) if len(layer._inbound_nodes) == 1 else "(shared)"
        block = block_of.get(layer.name, "-") if kept is None or layer.name in kept else "(dropped)"
        rows.append((str(index - len(model.layers)),) * (kept is not None) + (
            layer.name, type(layer).__name__, str(shape), f"{layer.count_params():,}" if layer.built else "0", block))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
