"""A small GAN on the unlabeled inputs; the discriminator's lower layers become the encoder.

The discriminator is the encoder (standardization and the recipe's blocks)
with a one-logit head; the generator maps Gaussian codes through the mirror
of those blocks (ReLU with BatchNorm, as in DCGAN) to `tanh` outputs scaled
into the data's value range, so fakes are raw inputs like the real ones and
pass through the same standardization. Both train with Adam (`beta_1=0.5`,
Radford et al., 2016), the discriminator on one-sided smoothed labels (0.9).

A backup keeps both players' weights, both optimizers' variables and the
random seed states (the codes drawn, and any dropout or noise), so a resumed
run goes on exactly as the interrupted one would have.

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.pretraining.run import run_pretrain
>>> run_pretrain(Recipe(task="gan", arch="conv", epochs=20, out="/tmp/gan-encoder"))   # doctest: +SKIP
"""

from __future__ import annotations

import math

import keras
import numpy as np

from transferkit.training import backend, runs
from transferkit.pieces.callbacks import StopOnNaN
from transferkit.data.image_files import ImageFiles
from transferkit.pretraining.job import Job, Pretrained, epoch_batches, final_metrics
from transferkit.pretraining.encoder import pooled
from transferkit.store.backup import random_state
from transferkit.training.defaults import gan_learning_rate
from transferkit.training.runner import Stage, fit_stage
from transferkit.recipe import Recipe

LATENT_DIM = 32
REAL_LABEL = 0.9


def build_generator(input_shape: tuple[int, ...], recipe: Recipe, value_range: tuple[float, float],
                    latent_dim: int = LATENT_DIM) -> keras.Model:
    """Gaussian codes → the mirror of the recipe's blocks → `tanh` → scaled into `value_range`."""
    codes = keras.Input((latent_dim,), name="codes")
    if recipe.arch == "dense":
        x = codes
        for i, units in enumerate(reversed(recipe.units), start=1):
            x = _block(keras.layers.Dense(units, use_bias=False, name=f"generator_block{i}_dense")(x), i)
        x = keras.layers.Dense(math.prod(input_shape), activation="tanh", name="generator_out")(x)
        x = keras.layers.Reshape(input_shape, name="generator_reshape")(x)
    else:
        height, width, channels = input_shape
        scale = 2 ** len(recipe.filters)
        start = (max(1, math.ceil(height / scale)), max(1, math.ceil(width / scale)))
        x = keras.layers.Dense(start[0] * start[1] * recipe.filters[-1], use_bias=False,
                               name="generator_project")(codes)
        x = keras.layers.Reshape((*start, recipe.filters[-1]), name="generator_reshape")(_block(x, 0))
        for i, filters in enumerate(reversed(recipe.filters), start=1):
            x = keras.layers.Conv2DTranspose(filters, 3, strides=2, padding="same", use_bias=False,
                                             name=f"generator_block{i}_up")(x)
            x = _block(x, i)
        x = keras.layers.Conv2D(channels, 3, padding="same", activation="tanh", name="generator_out")(x)
        x = keras.layers.CenterCrop(height, width, name="generator_crop")(x)
    lo, hi = value_range
    x = keras.layers.Rescaling((hi - lo) / 2, offset=(hi + lo) / 2, name="to_value_range")(x)
    return keras.Model(codes, x, name="generator")


def build_discriminator(encoder: keras.Model) -> keras.Model:
    """The encoder with a one-logit head: real (high) or generated (low)."""
    inputs = keras.Input(encoder.input.shape[1:], name="inputs")
    logit = keras.layers.Dense(1, name="real_or_fake")(pooled(encoder(inputs)))
    return keras.Model(inputs, logit, name="discriminator")


class GAN(keras.Model):
    """Alternating discriminator and generator steps in `fit` (TensorFlow or JAX).

    Example:

    >>> gan = GAN(generator, discriminator, seed=0)                      # doctest: +SKIP
    >>> gan.compile(keras.optimizers.Adam(2e-4, beta_1=0.5),
    ...             keras.optimizers.Adam(2e-4, beta_1=0.5))                # doctest: +SKIP
    >>> gan.fit(real_batches, epochs=10)                                   # doctest: +SKIP

    Args:
        generator: `keras.Model` from codes of shape `(latent_dim,)` to inputs.
        discriminator: `keras.Model` from inputs to one logit.
        seed: Int. Seed of the codes drawn. Defaults to `0`.
    """

    def __init__(self, generator: keras.Model, discriminator: keras.Model, seed: int = 0, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.discriminator = discriminator
        self.latent_dim = int(generator.input.shape[-1])
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.real_accuracy = keras.metrics.Mean(name="d_real_accuracy")
        self.built = True  # both players are built: `fit` must not trace `call` on real inputs to build it (JAX)

    def compile(self, d_optimizer: keras.optimizers.Optimizer, g_optimizer: keras.optimizers.Optimizer,
                **kwargs) -> None:
        """Set both players' optimizers and build them (so a backup's variables can be loaded before `fit`)."""
        super().compile(**kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer = g_optimizer
        d_optimizer.build(self.discriminator.trainable_variables)
        g_optimizer.build(self.generator.trainable_variables)
        if backend.name() == "jax":  # JAX's fit carries `optimizer.variables` through its stateless step
            self.optimizer = _Players(d_optimizer, g_optimizer)

    @property
    def metrics(self):
        return [self.d_loss_tracker, self.g_loss_tracker, self.real_accuracy]

    def call(self, codes, training=False):
        return self.generator(codes, training=training)

    def train_step(self, *args):
        """One discriminator step on a real and a generated batch, then one generator step.

        TensorFlow calls it with the batch and the step changes the variables;
        JAX with `(state, batch)`, and it returns the logs and the new state.
        """
        return self._jax_train_step(*args) if backend.name() == "jax" else self._tf_train_step(*args)

    def _tf_train_step(self, real):
        import tensorflow as tf

        batch = tf.shape(real)[0]
        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        codes = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        fake = self.generator(codes, training=True)
        with tf.GradientTape() as tape:
            real_logits = self.discriminator(real, training=True)
            fake_logits = self.discriminator(fake, training=True)
            d_loss = (bce(tf.fill(tf.shape(real_logits), REAL_LABEL), real_logits)
                      + bce(tf.zeros_like(fake_logits), fake_logits))
        weights = self.discriminator.trainable_weights
        self.d_optimizer.apply_gradients(zip(tape.gradient(d_loss, weights), weights))

        codes = keras.random.normal((batch, self.latent_dim), seed=self.seed_generator)
        with tf.GradientTape() as tape:
            fooled = self.discriminator(self.generator(codes, training=True), training=True)
            g_loss = bce(tf.ones_like(fooled), fooled)
        weights = self.generator.trainable_weights
        self.g_optimizer.apply_gradients(zip(tape.gradient(g_loss, weights), weights))

        self.d_loss_tracker.update_state(d_loss)
        self.g_loss_tracker.update_state(g_loss)
        self.real_accuracy.update_state(tf.reduce_mean(tf.cast(real_logits > 0, "float32")))
        return {m.name: m.result() for m in self.metrics}

    def _jax_train_step(self, state, real):
        """The same step as `_tf_train_step`, on values: every variable's value is looked up in `values`."""
        import jax

        ops = keras.ops
        trainable, non_trainable, optimizer_values, metrics_values = state
        variables = self.trainable_variables + self.non_trainable_variables
        values = dict(zip(map(id, variables), [*trainable, *non_trainable]))

        def get(vs):
            return [values[id(v)] for v in vs]

        def put(vs, new):
            values.update(zip(map(id, vs), new))

        def codes():
            seed = self.seed_generator.state
            with keras.StatelessScope(state_mapping=[(seed, values[id(seed)])]) as scope:
                drawn = keras.random.normal((ops.shape(real)[0], self.latent_dim), seed=self.seed_generator)
            values[id(seed)] = scope.get_current_value(seed)
            return drawn

        bce = keras.losses.BinaryCrossentropy(from_logits=True)
        g, d = self.generator, self.discriminator
        fake, g_state = g.stateless_call(get(g.trainable_variables), get(g.non_trainable_variables), codes(),
                                         training=True)
        put(g.non_trainable_variables, g_state)

        def d_loss_of(d_weights, d_state):
            real_logits, d_state = d.stateless_call(d_weights, d_state, real, training=True)
            fake_logits, d_state = d.stateless_call(d_weights, d_state, fake, training=True)
            loss = (bce(ops.full(ops.shape(real_logits), REAL_LABEL), real_logits)
                    + bce(ops.zeros_like(fake_logits), fake_logits))
            return loss, (d_state, real_logits)

        (d_loss, (d_state, real_logits)), grads = jax.value_and_grad(d_loss_of, has_aux=True)(
            get(d.trainable_variables), get(d.non_trainable_variables))
        put(d.non_trainable_variables, d_state)
        split = len(self.d_optimizer.variables)
        d_weights, d_optimizer_values = self.d_optimizer.stateless_apply(
            optimizer_values[:split], grads, get(d.trainable_variables))
        put(d.trainable_variables, d_weights)

        z = codes()

        def g_loss_of(g_weights, g_state, d_state):
            fake, g_state = g.stateless_call(g_weights, g_state, z, training=True)
            fooled, d_state = d.stateless_call(get(d.trainable_variables), d_state, fake, training=True)
            return bce(ops.ones_like(fooled), fooled), (g_state, d_state)

        (g_loss, (g_state, d_state)), grads = jax.value_and_grad(g_loss_of, has_aux=True)(
            get(g.trainable_variables), get(g.non_trainable_variables), get(d.non_trainable_variables))
        put(g.non_trainable_variables, g_state)
        put(d.non_trainable_variables, d_state)
        g_weights, g_optimizer_values = self.g_optimizer.stateless_apply(
            optimizer_values[split:], grads, get(g.trainable_variables))
        put(g.trainable_variables, g_weights)

        logs, new_metrics, at = {}, [], 0
        for metric, value in zip(self.metrics, (d_loss, g_loss, ops.mean(ops.cast(real_logits > 0, "float32")))):
            count = len(metric.variables)
            updated = metric.stateless_update_state(metrics_values[at:at + count], value)
            logs[metric.name] = metric.stateless_result(updated)
            new_metrics.extend(updated)
            at += count
        return logs, (get(self.trainable_variables), get(self.non_trainable_variables),
                      [*d_optimizer_values, *g_optimizer_values], new_metrics)


class _Players:
    """Both players' optimizers as the one `model.optimizer` whose variables JAX's `fit` carries."""

    built = True

    def __init__(self, *optimizers: keras.optimizers.Optimizer):
        self.optimizers = optimizers

    @property
    def variables(self) -> list:
        return [v for optimizer in self.optimizers for v in optimizer.variables]


def train_gan(job: Job) -> Pretrained:
    """`gan`: train the GAN for `epochs` on full batches of the training inputs; the pictures of its samples.

    The real batches come from the input pipeline (`epoch_batches`): image files are decoded batch by batch.
    """
    recipe = job.recipe
    lr = gan_learning_rate(recipe)
    generator = build_generator(job.data.input_shape, recipe, job.data.value_range)
    gan = GAN(generator, build_discriminator(job.encoder), seed=recipe.seed, name="gan")
    gan.compile(keras.optimizers.Adam(lr, beta_1=0.5), keras.optimizers.Adam(lr, beta_1=0.5))
    runs.print_line(f"gan: Adam(beta_1=0.5) at learning rate {lr:g} for both players"
                    f"{' (lr=auto: DCGAN default)' if recipe.lr == 'auto' else ''}", job.verbose)
    if recipe.epochs:
        x = job.x_train  # image files stream: each batch decoded in the pipeline as it is drawn
        x = x if isinstance(x, ImageFiles) else np.asarray(x, "float32")
        fit_stage(job.run, Stage(
            "pretrain gan", gan,
            lambda first: epoch_batches((x,), recipe.batch_size, recipe.seed, range(first, recipe.epochs),
                                        drop_remainder=True),
            start=0, end=recipe.epochs, batches_per_epoch=max(1, len(x) // recipe.batch_size), continuous=True,
            compile=False, training=[gan.d_optimizer, gan.g_optimizer, *random_state(gan)],
            # two players' losses rise and fall by design: no growth bound, no early stop
            guards=[StopOnNaN("pretrain gan")]))
    history = job.run.history
    samples = sample_inputs(generator, 16, seed=recipe.seed)
    from transferkit.store.pictures import image_grid, loss_figure

    figures = {
        "samples.png": image_grid([("generated", samples[:8]), ("generated", samples[8:]),
                                   ("real", job.sample(8))], value_range=job.data.value_range,
                                  title=f"gan: samples after {recipe.epochs} epochs"),
        "loss.png": loss_figure(history, keys=("d_loss", "g_loss"), title="pretrain --task gan"),
    }
    return Pretrained(history, final_metrics(history, ("d_loss", "g_loss", "d_real_accuracy")), figures)


def _block(x, index: int):
    x = keras.layers.BatchNormalization(name=f"generator_block{index}_bn")(x)
    return keras.layers.ReLU(name=f"generator_block{index}_relu")(x)


def sample_inputs(generator: keras.Model, n: int, seed: int = 0) -> np.ndarray:
    """`n` generated inputs from a trained generator."""
    codes = keras.random.normal((n, int(generator.input.shape[-1])), seed=seed)
    return keras.ops.convert_to_numpy(generator(codes, training=False))
