"""Pretraining on unlabeled inputs: autoencoders whose encoder is kept.

The encoder takes raw inputs: it standardizes them with the training split's
per-channel statistics (a `Normalization` layer inside the model), then runs
its blocks. The autoencoder reconstructs the standardized inputs; the denoising
one sees them with Gaussian noise added first.

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.pretraining import run_pretrain
>>> result = run_pretrain(Recipe(epochs=1, out="/tmp/enc"))   # doctest: +SKIP
"""

from __future__ import annotations

import math

import keras
import numpy as np

from transferkit import runs
from transferkit.data import pipeline
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe
from transferkit.setups import activation_layer, conv_stack, dense_stack, setup_for


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


def build_decoder(encoder: keras.Model, input_shape: tuple[int, ...], recipe: Recipe) -> keras.Model:
    """The mirror of `encoder`, back to the standardized input's shape."""
    setup = setup_for(recipe.activation)
    codes = keras.Input(encoder.output.shape[1:], name="codes")
    x = codes
    if recipe.arch == "dense":
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


def build_autoencoder(encoder: keras.Model, decoder: keras.Model, noise: float = 0.0,
                      data_std: float = 1.0) -> keras.Model:
    """inputs → (Gaussian noise of `noise` x `data_std`, training only) → encoder → decoder.

    Keras's GaussianNoise takes a standard deviation in [0, 1], so the noise is
    added on inputs scaled to unit deviation and scaled back.
    """
    inputs = keras.Input(encoder.input.shape[1:], name="inputs")
    x = inputs
    if noise > 0:
        x = keras.layers.Rescaling(1.0 / data_std, name="to_unit_std")(x)
        x = keras.layers.GaussianNoise(noise, name="noise")(x)
        x = keras.layers.Rescaling(data_std, name="from_unit_std")(x)
    return keras.Model(inputs, decoder(encoder(x)), name="autoencoder")


def run_pretrain(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Train the recipe's autoencoder on the unlabeled training inputs; save the encoder."""
    data, split = runs.prepare(recipe)
    out = runs.out_dir(recipe, "encoder")
    keras.utils.set_random_seed(recipe.seed)
    x_train, x_val = data.x[split.train], data.x[split.val]
    runs.make_optimizer(recipe, 1e-3)  # fail early on a bad name

    encoder = build_encoder(data.input_shape, recipe, x_train)
    decoder = build_decoder(encoder, data.input_shape, recipe)
    autoencoder = build_autoencoder(encoder, decoder, noise=recipe.noise if recipe.task == "denoising" else 0.0,
                                    data_std=float(np.sqrt(runs.channel_stats(x_train)[1].mean())))

    standardize = encoder.get_layer("normalize")
    targets = {name: keras.ops.convert_to_numpy(standardize(x)) for name, x in (("train", x_train), ("val", x_val))}
    train = pipeline(x_train, targets["train"], recipe.batch_size, shuffle=True, seed=recipe.seed)
    val = pipeline(x_val, targets["val"], recipe.batch_size) if len(x_val) else None
    runs.print_line(f"pretrain: {recipe.task} ({recipe.arch}, {recipe.activation}) on {len(x_train)} unlabeled "
                    f"inputs of {data.spec}", verbose)
    if recipe.lr == "auto":
        autoencoder.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss="mse")
        lr = runs.find_learning_rate(autoencoder, x_train, targets["train"], recipe, verbose)
    else:
        lr = recipe.lr
    callbacks = runs.compile_stage(autoencoder, recipe, lr,
                                   recipe.epochs * runs.steps_per_epoch(len(x_train), recipe.batch_size), "mse")
    history = autoencoder.fit(train, validation_data=val, epochs=recipe.epochs, callbacks=callbacks, shuffle=False,
                              verbose=2 if verbose else 0)

    hist = runs.merge_history({}, history)
    metrics = {"loss": hist["loss"][-1], **({"val_loss": hist["val_loss"][-1]} if "val_loss" in hist else {})}
    manifest = runs.base_manifest("encoder", recipe, data, split)
    manifest.update(
        task=recipe.task,
        arch=recipe.arch,
        activation=recipe.activation,
        normalization=dict(zip(("mean", "variance"), runs.channel_stats(x_train))),
        output_shape=list(encoder.output.shape[1:]),
        metrics=metrics,
    )
    runs.save_run(out, encoder, recipe, manifest, split, hist)
    runs.print_line(f"pretrain: reconstruction loss {metrics['loss']:.4f}"
                    + (f", validation {metrics['val_loss']:.4f}" if "val_loss" in metrics else "")
                    + f"; encoder saved to {out}", verbose)
    return runs.Result(model=encoder, history=hist, metrics=metrics, artifact=out, manifest=manifest)


def _stack_options(recipe: Recipe) -> dict:
    return {"activation": recipe.activation, "batchnorm": None if recipe.batchnorm == "none" else recipe.batchnorm,
            "dropout": recipe.dropout, "mc_dropout": recipe.mc_dropout, "max_norm": recipe.max_norm}
