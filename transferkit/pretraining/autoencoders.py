"""The `autoencoder`, `denoising` and `stacked` pretraining tasks: reconstruct the inputs.

`stacked` trains one shallow autoencoder per encoder block, greedily, each on
the codes of the blocks below (Vincent et al., 2010).
"""

from __future__ import annotations


import contextlib
from collections.abc import Callable

import keras
import numpy as np

from transferkit.training import runs
from transferkit.data.pipelines import batches_of, pipeline
from transferkit.recipe import Recipe
from transferkit.pretraining.job import Job, Pretrained, final_metrics, fit_task
from transferkit.pretraining.encoder import build_autoencoder, build_decoder, corruption, encoder_blocks


def train_autoencoder(job: Job) -> Pretrained:
    """`autoencoder` and `denoising`: reconstruct the standardized inputs (from noisy ones when denoising)."""
    recipe = job.recipe
    noise = recipe.noise if recipe.task == "denoising" else 0.0
    decoder = build_decoder(job.encoder, job.data.input_shape, recipe)
    autoencoder = build_autoencoder(job.encoder, decoder, noise=noise, data_std=job.data_std,
                                    noise_kind=recipe.noise_kind)
    targets = job.standardize(job.x_train)
    history = fit_task(job, autoencoder, job.x_train, targets, "mse",
                       validation=(job.x_val, job.standardize(job.x_val)))
    sample = job.sample()
    rows = [("inputs", sample)]
    if noise:
        corrupt = keras.Sequential(corruption(noise, recipe.noise_kind, job.data_std, seed=recipe.seed))
        rows.append((f"{recipe.noise_kind} noise", keras.ops.convert_to_numpy(corrupt(sample, training=True))))
    rows.append(("reconstructed", job.destandardize(keras.ops.convert_to_numpy(autoencoder(sample)))))
    return Pretrained(history, final_metrics(history, ("loss", "val_loss"), at=job.kept),
                      {"reconstructions.png": _reconstructions(job, rows)})


def train_stacked(job: Job, on_layer_trained: Callable[[int], None] | None = None) -> Pretrained:
    """Greedy layer-wise pretraining: each block a shallow autoencoder of the codes below it.

    Block 1 learns to reconstruct the standardized inputs, block 2 the codes of
    block 1 (frozen), and so on; each is a denoising autoencoder when `noise > 0`
    (Vincent et al., 2010), with a `DenseTranspose` decoder when `tied_weights`.
    Each block trains for `epochs` epochs, numbered on across blocks (block `i`
    from 0 is stage `i` of the backups); `on_layer_trained(i)` runs after block
    `i` is trained. The history holds every block's epochs in turn and `block` (which one).

    Nothing is held but weights: each block's model takes the raw inputs as
    they stream in, runs the blocks below it frozen (inference mode) and learns
    to bring back their codes (`_shallow_autoencoder`), so the codes are computed
    batch by batch and never kept, neither the images (an image folder is not
    decoded whole) nor an N x code array (a conv block's codes can outgrow the
    images). The price: the blocks below run forward again on every batch.
    """
    recipe = job.recipe
    head = [job.encoder.get_layer("normalize")]
    if recipe.arch == "dense" and len(job.data.input_shape) > 1:
        head.append(job.encoder.get_layer("flatten"))
    blocks = encoder_blocks(job.encoder)
    shapes = _code_shapes(job.data.input_shape, head, blocks)
    # every decoder first, so that the weights a backup keeps are the same all run long
    decoders = [_block_decoder(layers, shapes[i], shapes[i + 1], recipe, i + 1) for i, (_, layers) in enumerate(blocks)]
    kept = [job.encoder, *(layer for decoder in decoders for layer in decoder)]
    restored = False
    for i, (name, layers) in enumerate(blocks):
        start = i * recipe.epochs
        if job.run.finished_before(start + recipe.epochs):
            continue
        if not restored:  # the first block this run trains: the ones below come from the backup
            job.run.restore_weights(kept, start)
            restored = True
        below = head + [layer for _, lower in blocks[:i] for layer in lower]
        noisy = recipe.noise > 0 and recipe.noise_kind == "gaussian"  # noise scaled to the codes' spread
        shallow = _shallow_autoencoder(below, layers, decoders[i], job.data.input_shape, recipe, i + 1,
                                       _codes_std(below, job.x_train) if noisy else 1.0)
        runs.print_line(f"stacked: {name} ({i + 1} of {len(blocks)}) on codes of shape {shapes[i]}", job.verbose)
        with _frozen(below):
            fit_task(job, shallow, job.x_train, _no_targets(job.x_train), code_error,
                     validation=(job.x_val, _no_targets(job.x_val)), start=start, stage=i, kept=kept,
                     epoch_values={"block": i + 1})
        if on_layer_trained is not None:
            on_layer_trained(i)

    inputs = keras.Input(job.data.input_shape)
    x = job.encoder(inputs)
    for decoder in reversed(decoders):
        x = _apply(decoder, x)
    stack = keras.Model(inputs, keras.layers.Reshape(job.data.input_shape)(x), name="stacked_autoencoder")
    metrics = {}
    if recipe.epochs:
        metrics["loss"] = _mse(stack, job.x_train, job.standardize(job.x_train), recipe.batch_size)
        if len(job.x_val):
            metrics["val_loss"] = _mse(stack, job.x_val, job.standardize(job.x_val), recipe.batch_size)
    sample = job.sample()
    rows = [("inputs", sample), ("reconstructed", job.destandardize(keras.ops.convert_to_numpy(stack(sample))))]
    return Pretrained(job.run.history, metrics, {"reconstructions.png": _reconstructions(job, rows)})


def code_error(_, difference):
    """The mean squared error of a shallow autoencoder whose output is its reconstruction minus its target codes."""
    return keras.ops.mean(keras.ops.square(difference), axis=-1)


def _no_targets(x) -> np.ndarray:
    """One zero a row: the targets a shallow autoencoder computes in itself (`code_error` does not read them)."""
    return np.zeros((len(x), 1), "float32")


@contextlib.contextmanager
def _frozen(layers: list[keras.layers.Layer]):
    """`layers` not trainable inside the block (the blocks below the one training), as they were after it."""
    was = [layer.trainable for layer in layers]
    try:
        for layer in layers:
            layer.trainable = False
        yield
    finally:
        for layer, trainable in zip(layers, was):
            layer.trainable = trainable


def _codes_std(layers: list, x) -> float:
    """The standard deviation of every value of `layers`' codes of `x`, computed batch by batch (Chan et al.)."""
    count, mean, m2 = 0, 0.0, 0.0
    for batch in batches_of(x):
        codes = _apply(layers, batch).astype(np.float64).ravel()
        n, batch_mean = codes.size, float(codes.mean())
        delta = batch_mean - mean
        m2 += float(((codes - batch_mean) ** 2).sum()) + delta ** 2 * count * n / (count + n)
        mean += delta * n / (count + n)
        count += n
    return float(np.sqrt(m2 / max(count, 1)))


def _code_shapes(input_shape: tuple[int, ...], head: list, blocks) -> list[tuple[int, ...]]:
    """The shape of the codes into each block, then out of the last."""
    x = _apply(head, keras.Input(input_shape))
    shapes = [tuple(x.shape[1:])]
    for _, layers in blocks:
        x = _apply(layers, x)
        shapes.append(tuple(x.shape[1:]))
    return shapes


def _block_decoder(layers: list[keras.layers.Layer], shape: tuple[int, ...], codes: tuple[int, ...],
                   recipe: Recipe, index: int) -> list[keras.layers.Layer]:
    """The (built) layers taking a block's codes, of shape `codes`, back to its inputs' `shape`."""
    if len(shape) == 1 and recipe.tied_weights:
        from transferkit.pieces.tied import DenseTranspose

        dense = next(layer for layer in layers if isinstance(layer, keras.layers.Dense))
        decoder = [DenseTranspose(dense, name=f"decoder_block{index}_tied")]
    elif len(shape) == 1:
        decoder = [keras.layers.Dense(shape[0], name=f"decoder_block{index}_dense")]
    else:
        pooled_ = any(isinstance(layer, keras.layers.MaxPooling2D) for layer in layers)
        decoder = [keras.layers.Conv2DTranspose(shape[-1], 3, strides=2 if pooled_ else 1, padding="same",
                                                name=f"decoder_block{index}_up"),
                   keras.layers.CenterCrop(shape[0], shape[1], name=f"decoder_block{index}_crop")]
    _apply(decoder, keras.Input(codes))
    return decoder


def _shallow_autoencoder(below: list[keras.layers.Layer], layers: list[keras.layers.Layer],
                         decoder: list[keras.layers.Layer], input_shape: tuple[int, ...], recipe: Recipe, index: int,
                         data_std: float) -> keras.Model:
    """raw inputs → the blocks `below` (the codes) → (noise) → one block → its decoder, minus the codes.

    Its output is the reconstruction's error (`code_error` squares it): the
    codes it learns to bring back are computed in it, from each batch. The
    noise is seeded from the recipe's seed and the block, so that it is the
    same whether or not the blocks below were trained in this process.
    """
    inputs = keras.Input(input_shape)
    codes = _apply(below, inputs, training=False)
    x = codes
    for layer in corruption(recipe.noise, recipe.noise_kind, data_std, name=f"noise{index}", seed=recipe.seed + index):
        x = layer(x)
    error = keras.layers.Subtract(name=f"error{index}")([_apply(decoder, _apply(layers, x)), codes])
    return keras.Model(inputs, error, name=f"shallow_autoencoder{index}")


def _apply(layers: list, x, training: bool | None = None):
    """Run `x` through `layers` in order (inference mode for arrays, symbolic for tensors, `training` if given)."""
    symbolic = isinstance(x, keras.KerasTensor)
    for layer in layers:
        x = layer(x) if symbolic and training is None else layer(x, training=bool(training))
    return x if symbolic else keras.ops.convert_to_numpy(x)


def _mse(model: keras.Model, x, y, batch_size: int) -> float:
    """The mean squared error of `model` on `(x, y)`, batch by batch (image files stream)."""
    total, count = 0.0, 0
    for bx, by in pipeline(x, y, batch_size):
        error = keras.ops.convert_to_numpy(model(bx.numpy(), training=False)) - by.numpy()
        total += float(np.square(error.astype(np.float64)).sum())
        count += error.size
    return total / max(count, 1)


def _reconstructions(job: Job, rows: list[tuple[str, np.ndarray]]):
    from transferkit.store.pictures import image_grid

    return image_grid(rows, value_range=job.data.value_range,
                      title=f"{job.recipe.task}: {'validation' if len(job.x_val) else 'training'} inputs")
