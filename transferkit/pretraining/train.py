"""Pretraining on unlabeled inputs: six tasks, one kind of encoder kept.

The encoder takes raw inputs: it standardizes them with the training split's
per-channel statistics (a `Normalization` layer inside the model), then runs
its blocks (`encoder_block{i}_...`). Every task trains that same encoder and
saves it the same way, so `finetune --from` takes any of them:

| task | what the encoder learns from | picture |
|---|---|---|
| `autoencoder` | reconstructing its standardized inputs | `reconstructions.png` |
| `denoising` | the same from inputs with Gaussian or dropout (masking) noise | `reconstructions.png` |
| `stacked` | greedy layer-wise: each block a shallow autoencoder of the codes below | `reconstructions.png` |
| `rotation` | which of 0/90/180/270 degrees an image was rotated by | `predictions.png` |
| `pairs` | whether two augmented views come from the same image | `pairs.png` |
| `gan` | telling real inputs from a generator's (the discriminator's lower layers) | `samples.png` |

Each artifact also holds `loss.png`, the training curves.

Every task keeps a backup as it trains (at each epoch end but the run's last,
and every `backup_every` steps; see `transferkit.store.backup`) and running the same
command again continues from it, like `finetune`: the weights, the optimizers'
variables and the random seed states come back, and each epoch sees its
inputs in an order that is a function of the seed and the epoch alone
(`epoch_batches`), so a resumed run ends with the weights an uninterrupted one
would have. `stacked` numbers its epochs on across its blocks.

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.pretraining.train import run_pretrain
>>> result = run_pretrain(Recipe(task="stacked", epochs=5, out="/tmp/enc"))   # doctest: +SKIP
>>> sorted(p.name for p in result.artifact.glob("*.png"))                      # doctest: +SKIP
['loss.png', 'reconstructions.png']
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import re
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from transferkit.training import runs
from transferkit.store.backup import Backup, BackupCallback, Kept, random_state
from transferkit.data.sources import Data, Split, as_array, pipeline
from transferkit.data.image_files import ImageFiles, gather_together
from transferkit.training.defaults import describe_chosen, resolve_pretrain
from transferkit.pieces.health import TrainingHealth
from transferkit.errors import SettingsError
from transferkit.pieces.pretext_layers import _TrainingOnlyScale
from transferkit.recipe import Recipe
from transferkit.pieces.setups import activation_layer, conv_stack, dense_stack, setup_for

# task -> "module:function" training it (imported when used: the pretext and GAN modules import this one)
TASKS: dict[str, str] = {
    "autoencoder": "transferkit.pretraining.train:train_autoencoder",
    "denoising": "transferkit.pretraining.train:train_autoencoder",
    "stacked": "transferkit.pretraining.train:train_stacked",
    "rotation": "transferkit.pretraining.pretext:train_rotation",
    "pairs": "transferkit.pretraining.pretext:train_pairs",
    "gan": "transferkit.pretraining.gan:train_gan",
}
DECODER_TASKS = ("autoencoder", "denoising", "stacked")
_BLOCK = re.compile(r"^encoder_(block\d+)_")


@dataclasses.dataclass
class Job:
    """What a task trains on: the recipe, the data, its unlabeled splits, and the encoder to train.

    `backup` is where the run keeps its backups (none: no backups), `state` the
    backup's state when continuing an interrupted run.
    """

    recipe: Recipe
    data: Data
    split: Split
    encoder: keras.Model
    verbose: bool
    backup: Backup | None = None
    state: dict[str, Any] | None = None
    kept: int | None = None  # the history entry whose weights early stopping kept (None: the last)

    @property
    def epochs(self) -> int:
        """The run's epochs: `epochs`, times the blocks for `stacked` (numbered on across them)."""
        blocks = len(encoder_blocks(self.encoder)) if self.recipe.task == "stacked" else 1
        return self.recipe.epochs * blocks

    @property
    def resume_at(self) -> int:
        """The epoch the interrupted run stopped in (0 when not continuing one)."""
        return int(self.state["epoch"]) if self.state else 0

    @property
    def history(self) -> dict[str, list[float]]:
        """The interrupted run's history (empty when not continuing one)."""
        return {k: list(v) for k, v in self.state["history"].items()} if self.state else {}

    def trained_before(self, end: int) -> bool:
        """Whether the run's epochs up to `end` were trained before the interruption."""
        return self.state is not None and end <= self.resume_at

    def load_backup(self, kept: Kept, start: int) -> None:
        """Give `kept` the backed-up weights, when continuing a run that stopped in or after epoch `start`."""
        if self.state and start <= self.resume_at:
            self.backup.load_weights(kept)

    @property
    def x_train(self) -> np.ndarray:
        return self.data.x[self.split.train]

    @property
    def x_val(self) -> np.ndarray:
        return self.data.x[self.split.val]

    @property
    def data_std(self) -> float:
        """The inputs' typical standard deviation (the root of the mean per-channel variance)."""
        return float(np.sqrt(runs.channel_stats(self.x_train)[1].mean()))

    def standardize(self, x: np.ndarray | ImageFiles) -> np.ndarray | ImageFiles:
        """`x` through the encoder's normalization; image files stay files, standardized as they are decoded."""
        if isinstance(x, ImageFiles):
            return x.standardized(*runs.channel_stats(self.x_train))
        return keras.ops.convert_to_numpy(self.encoder.get_layer("normalize")(x))

    def destandardize(self, z: np.ndarray) -> np.ndarray:
        mean, variance = runs.channel_stats(self.x_train)
        return np.asarray(z) * np.sqrt(variance) + mean

    def sample(self, n: int = 8) -> np.ndarray:
        """`n` inputs to draw in pictures: validation inputs where there are any, else training ones."""
        x = self.x_val if len(self.x_val) else self.x_train
        return as_array(x[:n])


@dataclasses.dataclass
class Pretrained:
    """What a task hands back: its history, final metrics and pictures (file name -> figure)."""

    history: dict[str, list[float]]
    metrics: dict[str, float]
    figures: dict[str, Any]


def run_pretrain(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Train the recipe's task on the unlabeled training inputs; save the encoder and pictures.

    Example:

    >>> run_pretrain(Recipe(task="rotation", arch="conv", epochs=5, out="/tmp/enc"))   # doctest: +SKIP

    Raises:
        SettingsError: settings that cannot work for the task (before any training).
    """
    recipe = recipe.validate()
    runs.check_out_writable(runs.out_dir(recipe, "encoder"))
    with runs.training_context(recipe):
        return _pretrain(recipe, verbose)


def _pretrain(recipe: Recipe, verbose: bool) -> runs.Result:
    data, split = runs.prepare(recipe)
    settings = recipe.run_settings()  # as given: what is chosen from them follows
    recipe, chosen = resolve_pretrain(recipe, len(split.train))
    runs.print_line(describe_chosen("pretrain", chosen), verbose)
    check_settings(recipe, data, split)
    out = runs.out_dir(recipe, "encoder")
    backup = Backup.for_output(out, settings)
    state = backup.state(restart=recipe.restart)
    keras.utils.set_random_seed(recipe.seed)
    runs.make_optimizer(recipe, 1e-3)  # fail early on a bad name
    x_train = data.x[split.train]
    encoder = build_encoder(data.input_shape, recipe, x_train)
    job = Job(recipe, data, split, encoder, verbose, backup, state)
    runs.print_line(f"pretrain: {recipe.task} ({recipe.arch}, {recipe.activation}) on {len(x_train)} unlabeled "
                    f"inputs of {data.spec}", verbose)
    if state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {job.resume_at + 1} of {job.epochs}",
                        verbose)
    module, _, name = TASKS[recipe.task].partition(":")
    done: Pretrained = getattr(importlib.import_module(module), name)(job)
    done.figures.setdefault("loss.png", _loss_picture(recipe, done.history))

    manifest = runs.base_manifest("encoder", recipe, data, split)
    manifest.update(
        task=recipe.task,
        arch=recipe.arch,
        activation=recipe.activation,
        normalization=dict(zip(("mean", "variance"), runs.channel_stats(x_train))),
        output_shape=list(encoder.output.shape[1:]),
        pictures=sorted(done.figures),
        metrics=done.metrics,
    )
    runs.save_run(out, encoder, recipe, manifest, split, done.history, figures=done.figures)
    backup.discard()
    shown = ", ".join(f"{k} {v:.4f}" for k, v in done.metrics.items()) or "untrained (epochs=0)"
    runs.print_line(f"pretrain: {recipe.task} {shown}; encoder and {', '.join(sorted(done.figures))} saved to {out}",
                    verbose)
    return runs.Result(model=encoder, history=done.history, metrics=done.metrics, artifact=out, manifest=manifest)


def check_settings(recipe: Recipe, data: Data, split: Split) -> None:
    """Refuse, before any training, settings the task cannot use; one line naming the value.

    Raises:
        SettingsError: an unknown task or noise kind, tied weights without dense
            layers to tie or without a decoder, denoising without noise, rotation
            of inputs that are not square images, a GAN on fewer inputs than a batch.
    """
    if recipe.task not in TASKS:
        raise SettingsError(f"Unknown pretraining task {recipe.task!r}; expected one of {', '.join(TASKS)}. "
                            f"Received: task={recipe.task!r}")
    if recipe.noise_kind not in ("gaussian", "dropout"):
        raise SettingsError(f"Unknown noise kind {recipe.noise_kind!r}; expected gaussian or dropout. "
                            f"Received: noise_kind={recipe.noise_kind!r}")
    if recipe.arch == "conv" and len(data.input_shape) != 3:
        raise SettingsError(f"--arch conv needs images (H, W, C); the data's inputs have shape {data.input_shape}.")
    if recipe.tied_weights and recipe.arch != "dense":
        raise SettingsError(f"--tied-weights ties a dense decoder to the encoder's Dense kernels; a conv encoder "
                            f"has none. Use --arch dense or --no-tied-weights. Received: arch={recipe.arch!r}")
    if recipe.tied_weights and recipe.task not in DECODER_TASKS:
        raise SettingsError(f"--tied-weights needs a decoder ({', '.join(DECODER_TASKS)}); task {recipe.task!r} "
                            f"has none. Received: task={recipe.task!r}, tied_weights=True")
    if recipe.task == "denoising" and recipe.noise <= 0:
        raise SettingsError(f"--task denoising needs --noise > 0 (without noise it is --task autoencoder). "
                            f"Received: noise={recipe.noise}")
    if recipe.noise_kind == "dropout" and recipe.noise >= 1:
        raise SettingsError(f"--noise-kind dropout drops a fraction of inputs: --noise must be in [0, 1). "
                            f"Received: noise={recipe.noise}")
    if recipe.task == "rotation" and (len(data.input_shape) != 3 or data.input_shape[0] != data.input_shape[1]):
        raise SettingsError(f"--task rotation rotates square images by 0/90/180/270 degrees; the data's inputs "
                            f"have shape {data.input_shape}. Received: task='rotation'")
    if recipe.task == "gan" and len(split.train) < recipe.batch_size:
        raise SettingsError(f"--task gan trains on full batches: the training split has {len(split.train)} inputs, "
                            f"fewer than one batch. Lower --batch-size or use more data. "
                            f"Received: batch_size={recipe.batch_size}")


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
                _TrainingOnlyScale(1.0 - noise, name=f"{name}_unscale")]
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


def fit_task(job: Job, model: keras.Model, x: Any, y: Any, loss: Any, validation: tuple[Any, Any] | None = None,
             metrics: list | None = None, start: int = 0, stage: int = 0, kept: Kept = None,
             history: dict[str, list[float]] | None = None, epoch_values: dict[str, float] | None = None
             ) -> dict[str, list[float]]:
    """Compile `model` with the recipe's optimizer and schedule and fit it for `recipe.epochs`; the run's history.

    `lr="auto"` runs the LR finder on `(x, y)` first. The epochs are the run's
    `start + 1`..`start + epochs`; `history` is the run's history before them
    (by default the interrupted run's, see `Job.history`); `stage`, `kept`, `epoch_values`: see
    `fit_resumable`.
    """
    recipe = job.recipe
    history = job.history if history is None else history
    if recipe.epochs == 0:
        return history
    if recipe.lr == "auto":
        model.compile(optimizer=runs.make_optimizer(recipe, 1e-3), loss=loss, metrics=metrics)
        lr = runs.find_learning_rate(model, x, y, recipe, job.verbose)
    else:
        lr = recipe.lr
    steps = runs.steps_per_epoch(len(y), recipe.batch_size)
    callbacks = runs.compile_stage(model, recipe, lr, recipe.epochs * steps, loss, metrics)
    job.load_backup(model if kept is None else kept, start)
    val = pipeline(*validation, recipe.batch_size) if validation is not None and len(validation[1]) else None
    name = f"pretrain {recipe.task}" + (f" block {stage + 1}" if recipe.task == "stacked" else "")
    guards, stopping = runs.stage_guards(name, recipe.patience, validated=val is not None, learning_rate=lr)
    callbacks.extend(guards)
    if recipe.health_steps:
        callbacks.append(TrainingHealth(pipeline(x, y, recipe.batch_size), every=recipe.health_steps,
                                        log_dir=recipe.tensorboard, loss=loss,
                                        initial_step=max(start, job.resume_at) * steps))
    callbacks.extend(runs.curves(recipe))
    return fit_resumable(job, model, (x, y), history, start=start, stage=stage, kept=kept, validation=val,
                         callbacks=callbacks, stopping=stopping, epoch_values=epoch_values)


def fit_resumable(job: Job, model: keras.Model, data: tuple[Any, ...], history: dict[str, list[float]], *,
                  start: int = 0, stage: int = 0, kept: Kept = None, optimizers: list | None = None,
                  validation: Any = None, callbacks: list | None = None, stopping: Any = None,
                  drop_remainder: bool = False, epoch_values: dict[str, float] | None = None
                  ) -> dict[str, list[float]]:
    """Fit the compiled `model` on the run's epochs `start + 1`..`start + recipe.epochs`, backing up as it goes.

    `data` are the arrays an epoch goes through once, in batches (see
    `epoch_batches`); `history` is the run's history before these epochs and
    the run's history after them is returned. The backup keeps the weights of
    `kept` (by default `model`), and as training state the `optimizers` (by
    default `model.optimizer`; built) and `model`'s random seed states.
    Continuing an interrupted run whose backup was made in this `stage`, the
    training state comes back first (the weights: `Job.load_backup`, called
    before), and training goes on from the epoch it stopped in. `stopping`: the early stopping
    among `callbacks`, whose progress the backup keeps; `epoch_values`: entries the history gets at
    every epoch (such as the block), in the backup too.
    """
    recipe = job.recipe
    first, end = max(start, job.resume_at), start + recipe.epochs
    if optimizers is None:
        optimizers = [model.optimizer]
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    training = [*optimizers, *random_state(model)]
    if job.state and job.state["stage"] == stage:
        job.backup.restore_training(training)
        if stopping is not None:
            stopping.load_state(job.backup.stopping())
    callbacks = list(callbacks or [])
    if job.backup is not None:
        callbacks.append(BackupCallback(job.backup, model if kept is None else kept, stage, history,
                                        recipe.backup_every, final_epoch=job.epochs, training=training,
                                        stopping=stopping, epoch_values=epoch_values))
    batches = epoch_batches(data, recipe.batch_size, recipe.seed, range(first, end), drop_remainder=drop_remainder)
    fit = model.fit(batches, validation_data=validation, initial_epoch=first, epochs=end, shuffle=False,
                    steps_per_epoch=_batches_per_epoch(len(data[0]), recipe.batch_size, drop_remainder),
                    callbacks=callbacks, verbose=2 if job.verbose else 0)
    merged = runs.merge_history({k: list(v) for k, v in history.items()}, fit)
    for key, value in (epoch_values or {}).items():
        merged[key] = merged.get(key, []) + [float(value)] * (len(merged["loss"]) - len(merged.get(key, [])))
    if stopping is not None and stopping.best_weights is not None:  # the best epoch's weights came back
        job.kept = len(history.get("loss", [])) + stopping.best_epoch - first
    return merged


def epoch_batches(data: tuple[Any, ...], batch_size: int, seed: int, epochs: range, drop_remainder: bool = False):
    """The batches of `epochs` one after the other, each epoch a shuffle of `data` seeded by `seed` and its number.

    Each epoch's order is a function of the seed and the epoch alone (not of
    how many epochs ran before in this process), so a fit resumed at epoch `k`
    gets the batches an uninterrupted one would. One dataset for every epoch:
    `fit` takes it with `steps_per_epoch`.

    Example:

    >>> import numpy as np
    >>> x = np.arange(6.0)
    >>> later = [b.numpy().tolist() for b in epoch_batches((x,), 3, 0, range(1, 3))]
    >>> later == [b.numpy().tolist() for b in epoch_batches((x,), 3, 0, range(3))][2:]
    True
    """
    import tensorflow as tf

    arrays = tuple(a if isinstance(a, ImageFiles) else tf.convert_to_tensor(a) for a in data)
    count, seed = len(data[0]), tf.constant(seed, "int64")

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)

    def examples(indices):
        batch = tuple(gather_together(arrays, indices))  # image files: decoded here, in the parallel map
        return batch if len(batch) > 1 else batch[0]

    return (tf.data.Dataset.from_tensor_slices(np.asarray(epochs, "int64")).flat_map(one_epoch)
            .map(examples, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def _batches_per_epoch(examples: int, batch_size: int, drop_remainder: bool) -> int:
    return max(1, examples // batch_size) if drop_remainder else runs.steps_per_epoch(examples, batch_size)


def final_metrics(history: dict[str, list[float]], keys: tuple[str, ...] = (), at: int | None = None
                  ) -> dict[str, float]:
    """Each history entry's value (of `keys`, if given) at epoch entry `at`, by default the last: the run's metrics.

    `at` is `Job.kept` when early stopping kept an earlier epoch's weights.
    """
    return {k: float(v[-1 if at is None else at]) for k, v in history.items() if v and (not keys or k in keys)}


def pooled(x):
    """A feature map pooled (images) or flattened (other shapes) to vectors."""
    if len(x.shape) == 4:
        return keras.layers.GlobalAveragePooling2D(name="pool")(x)
    if len(x.shape) > 2:
        return keras.layers.Flatten(name="flatten_features")(x)
    return x


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
    block 1 (computed once, block 1 frozen by construction), and so on; each is
    a denoising autoencoder when `noise > 0` (Vincent et al., 2010), with a
    `DenseTranspose` decoder when `tied_weights`. Each block trains for
    `epochs` epochs, numbered on across blocks (block `i` from 0 is stage `i`
    of the backups); `on_layer_trained(i)` runs after block `i` is trained.
    The history holds every block's epochs in turn and `block` (which one).
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
    history = job.history
    codes: dict[str, np.ndarray] | None = None
    for i, (name, layers) in enumerate(blocks):
        start = i * recipe.epochs
        if job.trained_before(start + recipe.epochs):
            continue
        if codes is None:  # the first block this run trains: the ones below come from the backup
            job.load_backup(kept, start)
            below = head + [layer for _, lower in blocks[:i] for layer in lower]
            codes = {"train": _apply(below, job.x_train), "val": _apply(below, job.x_val)}
        shallow = _shallow_autoencoder(layers, decoders[i], shapes[i], recipe, i + 1, float(codes["train"].std()))
        runs.print_line(f"stacked: {name} ({i + 1} of {len(blocks)}) on codes of shape {shapes[i]}", job.verbose)
        history = fit_task(job, shallow, codes["train"], codes["train"], "mse", validation=(codes["val"], codes["val"]),
                           start=start, stage=i, kept=kept, history=history, epoch_values={"block": i + 1})
        codes = {k: _apply(layers, v) for k, v in codes.items()}
        if on_layer_trained is not None:
            on_layer_trained(i)

    inputs = keras.Input(job.data.input_shape)
    x = job.encoder(inputs)
    for decoder in reversed(decoders):
        x = _apply(decoder, x)
    stack = keras.Model(inputs, keras.layers.Reshape(job.data.input_shape)(x), name="stacked_autoencoder")
    metrics = {}
    if recipe.epochs:
        metrics["loss"] = _mse(stack, job.x_train, job.standardize(job.x_train))
        if len(job.x_val):
            metrics["val_loss"] = _mse(stack, job.x_val, job.standardize(job.x_val))
    sample = job.sample()
    rows = [("inputs", sample), ("reconstructed", job.destandardize(keras.ops.convert_to_numpy(stack(sample))))]
    return Pretrained(history, metrics, {"reconstructions.png": _reconstructions(job, rows)})


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


def _shallow_autoencoder(layers: list[keras.layers.Layer], decoder: list[keras.layers.Layer], shape: tuple[int, ...],
                         recipe: Recipe, index: int, data_std: float) -> keras.Model:
    """codes → (noise) → one encoder block → its decoder back to the codes' shape.

    The noise is seeded from the recipe's seed and the block, so that it is
    the same whether or not the blocks below were trained in this process.
    """
    inputs = keras.Input(shape)
    x = inputs
    for layer in corruption(recipe.noise, recipe.noise_kind, data_std, name=f"noise{index}", seed=recipe.seed + index):
        x = layer(x)
    return keras.Model(inputs, _apply(decoder, _apply(layers, x)), name=f"shallow_autoencoder{index}")


def _apply(layers: list, x):
    """Run `x` through `layers` in order (inference mode for arrays, symbolic for tensors)."""
    symbolic = isinstance(x, keras.KerasTensor)
    for layer in layers:
        x = layer(x) if symbolic else layer(x, training=False)
    return x if symbolic else keras.ops.convert_to_numpy(x)


def _mse(model: keras.Model, x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x), np.asarray(y)  # image files decoded whole: `stacked` does not stream
    return float(np.mean((keras.ops.convert_to_numpy(model.predict(x, verbose=0)) - y) ** 2))


def _reconstructions(job: Job, rows: list[tuple[str, np.ndarray]]):
    from transferkit.store.pictures import image_grid

    return image_grid(rows, value_range=job.data.value_range,
                      title=f"{job.recipe.task}: {'validation' if len(job.x_val) else 'training'} inputs")


def _loss_picture(recipe: Recipe, history: dict[str, list[float]]):
    from transferkit.store.pictures import loss_figure

    blocks = history.get("block", [])
    bands = [i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]]
    return loss_figure({k: v for k, v in history.items() if k != "block"}, bands=bands,
                       title=f"pretrain --task {recipe.task}")


def _stack_options(recipe: Recipe) -> dict:
    return {"activation": recipe.activation, "batchnorm": None if recipe.batchnorm == "none" else recipe.batchnorm,
            "dropout": recipe.dropout, "mc_dropout": recipe.mc_dropout, "max_norm": recipe.max_norm}
