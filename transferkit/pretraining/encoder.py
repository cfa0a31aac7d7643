"""The encoder every pretraining task trains, its decoder, and the noise of denoising.

The encoder takes raw inputs, standardizes them with the training split's
per-channel statistics (a `Normalization` layer named `normalize`), then runs
its blocks (`encoder_block{i}_...`, from `transferkit.pieces.setups`).

Example:

>>> from transferkit.recipe import Recipe
>>> import numpy as np
>>> encoder = build_encoder((64,), Recipe(units=(32, 16)), np.zeros((10, 64), "float32"))
>>> [name for name, _ in encoder_blocks(encoder)]
['block1', 'block2']
"""

from __future__ import annotations


import math
import re

import keras
import numpy as np

from transferkit.training import runs
from transferkit.errors import SettingsError
from transferkit.pieces.pretext_layers import TrainingOnlyScale
from transferkit.recipe import Recipe
from transferkit.pieces.setups import activation_layer, conv_stack, dense_stack, setup_for


_BLOCK = re.compile(r"^encoder_(block\d+)_")


def build_encoder(input_shape: tuple[int, ...], recipe: Recipe, x_train: np.ndarray) -> keras.Model:
    """Raw inputs → standardization → the recipe's dense or conv blocks."""
    if recipe.arch == "conv" and len(input_shape) != 3:
        raise SettingsError(f"--arch conv needs images (H, W, C); the data's inputs have shape {input_shape}.")
    mean, variance = runs.channel_stats(x_train)
    inputs = keras.Input(input_shape, name="inputs")
    x = keras.layers.Normalization(axis=-1, mean=mean, variance=variance, name="normalize")(inputs)
    if recipe.arch == "dense":
        if len(input_shape) > 1:
            x = keras.layers.Flatten(name="flatten")(x)
        layers = dense_stack(recipe.units, **_stack_options(recipe), name="encoder_")
    else:
        layers = conv_stack(recipe.filters, **_stack_options(recipe), name="encoder_")
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x, name="encoder")


def encoder_blocks(encoder: keras.Model) -> list[tuple[str, list[keras.layers.Layer]]]:
    """Every layer of each `encoder_block{i}_` block, bottom to top (pooling and dropout included)."""
    blocks: dict[str, list[keras.layers.Layer]] = {}
    for layer in encoder.layers:
        match = _BLOCK.match(layer.name)
        if match:
            blocks.setdefault(match.group(1), []).append(layer)
    return list(blocks.items())


def build_decoder(encoder: keras.Model, input_shape: tuple[int, ...], recipe: Recipe) -> keras.Model:
    """The mirror of `encoder`, back to the standardized input's shape.

    With `recipe.tied_weights` (dense only) each decoder layer is a
    `DenseTranspose` of the matching encoder Dense: one kernel for both.
    """
    setup = setup_for(recipe.activation)
    codes = keras.Input(encoder.output.shape[1:], name="codes")
    x = codes
    if recipe.arch == "dense" and recipe.tied_weights:
        from transferkit.pieces.tied import DenseTranspose

        denses = [layer for _, layers in encoder_blocks(encoder) for layer in layers
                  if isinstance(layer, keras.layers.Dense)]
        for i, dense in enumerate(reversed(denses), start=1):
            last = i == len(denses)
            x = DenseTranspose(dense, name="decoder_out" if last else f"decoder_block{i}_tied")(x)
            if not last:
                x = activation_layer(recipe.activation, name=f"decoder_block{i}_act")(x)
        x = keras.layers.Reshape(input_shape, name="decoder_reshape")(x)
    elif recipe.arch == "dense":
        for layer in dense_stack(list(reversed(recipe.units[:-1])), **_stack_options(recipe), name="decoder_"):
            x = layer(x)
        x = keras.layers.Dense(math.prod(input_shape), name="decoder_out")(x)
        x = keras.layers.Reshape(input_shape, name="decoder_reshape")(x)
    else:
        for i, filters in enumerate(reversed(recipe.filters), start=1):
            x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", activation=None,
                                             kernel_initializer=setup.initializer, name=f"decoder_up{i}")(x)
            x = activation_layer(recipe.activation, name=f"decoder_act{i}")(x)
        x = keras.layers.Conv2D(input_shape[-1], 3, padding="same", name="decoder_out")(x)
        x = keras.layers.CenterCrop(input_shape[0], input_shape[1], name="decoder_crop")(x)
    return keras.Model(codes, x, name="decoder")


def corruption(noise: float, noise_kind: str = "gaussian", data_std: float = 1.0, name: str = "noise",
               seed: int | None = None) -> list[keras.layers.Layer]:
    """Layers that corrupt raw inputs while training (and pass them through at inference).

    `gaussian`: adds noise of standard deviation `noise x data_std` (Keras's
    GaussianNoise takes a deviation on the unit scale, so the inputs are scaled
    to it and back). `dropout`: masking noise, a fraction `noise` of the inputs
    set to 0 without rescaling the others (Vincent et al., 2010).

    Example:

    >>> [l.name for l in corruption(0.2, "dropout")]
    ['noise', 'noise_unscale']
    """
    if noise <= 0:
        return []
    if noise_kind == "gaussian":
        return [keras.layers.Rescaling(1.0 / data_std, name=f"{name}_to_unit_std"),
                keras.layers.GaussianNoise(noise, seed=seed, name=name),
                keras.layers.Rescaling(data_std, name=f"{name}_from_unit_std")]
    if noise_kind == "dropout":
        return [keras.layers.Dropout(noise, seed=seed, name=name),
                TrainingOnlyScale(1.0 - noise, name=f"{name}_unscale")]
    raise SettingsError(f"Unknown noise kind {noise_kind!r}; expected gaussian or dropout. "
                        f"Received: noise_kind={noise_kind!r}")


def build_autoencoder(encoder: keras.Model, decoder: keras.Model, noise: float = 0.0,
                      data_std: float = 1.0, noise_kind: str = "gaussian") -> keras.Model:
    """inputs → (noise, training only; see `corruption`) → encoder → decoder."""
    inputs = keras.Input(encoder.input.shape[1:], name="inputs")
    x = inputs
    for layer in corruption(noise, noise_kind, data_std):
        x = layer(x)
    return keras.Model(inputs, decoder(encoder(x)), name="autoencoder")


def pooled(x):
    """A feature map pooled (images) or flattened (other shapes) to vectors."""
    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if len(x.shape) > 2:
        return keras.layers.Flatten(name="flatten_features")(x)
    return x


def _stack_options(recipe: Recipe) -> dict:
    return {"activation": recipe.activation, "batchnorm": None if recipe.batchnorm == "none" else recipe.batchnorm,
            "dropout": recipe.dropout, "mc_dropout": recipe.mc_dropout, "max_norm": recipe.max_norm}
