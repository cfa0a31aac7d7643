"""The classifier fine-tuning trains: a base (an encoder, a backbone or a model file), its blocks, a head.

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.data.sources import load_data
>>> clf = build_classifier(Recipe(backbone="mobilenetv2"), load_data("digits"), None)   # doctest: +SKIP
>>> [name for name, _ in clf.blocks][-1]                                                 # doctest: +SKIP
'block_16'
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import keras

from transferkit.store.artifacts import Encoder
from transferkit.pieces.augmentation import augmentation_for
from transferkit.pieces.backbones import Blocks, backbone_base, saved_base
from transferkit.finetuning.bases import file_body
from transferkit.finetuning.hub import hub_base, is_hub
from transferkit.data.sources import Data
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe
from transferkit.pieces.setups import dropout_layer, setup_for


@dataclasses.dataclass
class Classifier:
    """The classifier and its parts: the base, its blocks, the path to the features, the head.

    `features` (inputs to pooled base outputs) and `head` (those outputs to the classes, the
    classifier's own head layers) are models over the same layers, built when first asked
    for: a run whose stages never train on cached base outputs has no use for them.
    """

    model: keras.Model
    base: keras.Model
    blocks: Blocks
    info: dict[str, Any]
    pooled: Any  # the classifier's symbolic tensor between the features and the head
    head_layers: list[keras.layers.Layer]
    augment: str = "none"  # the augmentation's canonical spec (`Augmentation.spec`)

    @functools.cached_property
    def features(self) -> keras.Model:
        return keras.Model(self.model.inputs[0], self.pooled, name="features")

    @functools.cached_property
    def head(self) -> keras.Model:
        features_in = keras.Input(self.pooled.shape[1:], name="features")
        outputs = features_in
        for layer in self.head_layers:
            outputs = layer(outputs)
        return keras.Model(features_in, outputs, name="head_on_features")


def build_classifier(recipe: Recipe, data: Data, encoder: Encoder | None) -> Classifier:
    """inputs → (augmentation) → (adapter) → base → pooling: the features; then (dropout) → softmax: the head.

    The base: the encoder `from_` (as `artifacts.read_encoder` read and loaded it), the Keras Applications
    `backbone`, or the body of the model file `base`.
    The head's kernel and bias start at zero, so its first prediction is uniform (loss ln K for K classes) however
    large the base's outputs, and its first gradients are a logistic regression's on them: BiT's zero head
    (Kolesnikov et al. 2020, "Big Transfer", `zero_head` in google-research/big_transfer).
    """
    inputs = keras.Input(data.input_shape, name="inputs")
    augmentation = augmentation_for(inputs, recipe.augment, data.value_range)  # refuses inputs that are not images
    augmented = inputs if augmentation is None else augmentation(inputs)
    saved = preprocess = None  # a saved model to put on the inputs (`saved_base`), and its input adapter
    if encoder is not None:
        if tuple(encoder.manifest.input_shape) != data.input_shape:
            raise SettingsError(
                f"The data's inputs have shape {data.input_shape}, but the encoder in {recipe.from_!r} "
                f"takes {tuple(encoder.manifest.input_shape)}."
            )
        saved = encoder.model
        info = {"from": str(recipe.from_), "kind": "encoder", "description": f"encoder {recipe.from_}"}
    elif recipe.base:
        saved, info = file_body(recipe.base, recipe.cut, recipe.preprocess)
        preprocess = info["preprocess"]
    elif is_hub(recipe.backbone):  # keras-hub: the preset's image converter, blocks from its pyramid levels
        x, base, blocks, info = hub_base(augmented, data.value_range, recipe.backbone, recipe.image_size,
                                         recipe.weights, recipe.precision)
    else:
        x, base, blocks, info = backbone_base(augmented, data.value_range, recipe.backbone, recipe.weights,
                                              recipe.image_size)
    if saved is not None:
        x, base, blocks, rule = saved_base(augmented, data.value_range, saved, recipe.precision, preprocess)
        info = info if rule is None else {**info, "blocks_rule": rule}
    # pooling has no weights: it belongs to the features, so a cached head stage stores the pooled outputs
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(x.shape) > 2:
        x = keras.layers.Flatten(name="flatten")(x)
    head_layers = []
    if recipe.dropout:
        kind = setup_for(encoder.manifest.activation).dropout if encoder else "plain"
        head_layers.append(dropout_layer(recipe.dropout, kind, recipe.mc_dropout, name="head_dropout"))
    # zero weights: the first prediction is uniform (loss ln K), however large the features (BiT's zero head)
    head_layers.append(keras.layers.Dense(data.num_classes, activation="softmax", kernel_initializer="zeros",
                                          dtype="float32", name="head"))
    outputs = x
    for layer in head_layers:
        outputs = layer(outputs)
    return Classifier(model=keras.Model(inputs, outputs, name="classifier"), base=base, blocks=blocks, info=info,
                      pooled=x, head_layers=head_layers,
                      augment="none" if augmentation is None else augmentation.spec)
