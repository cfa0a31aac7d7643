"""What a pretraining task trains on (`Job`), what it hands back (`Pretrained`), and its one fit.

`fit_task` trains a task's model through the stage runner
(`transferkit.training.runner`) with batches whose order is a function of the
seed and the epoch alone (`epoch_batches`), so a resumed run ends as an
uninterrupted one would.
"""

from __future__ import annotations


import dataclasses
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from transferkit.training import runs
from transferkit.store.backup import Backup, Kept
from transferkit.data.pipelines import as_array, learning_rate_data, pipeline
from transferkit.data.sources import Data, Split
from transferkit.data.image_files import ImageFiles, gather_together
from transferkit.training.runner import Run, Stage, fit_stage
from transferkit.recipe import Recipe
from transferkit.pretraining.plan import PlannedStage, plan_pretrain


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
    stages: list[PlannedStage] | None = None  # the run's Plan (default: `plan_pretrain` of the recipe)
    kept: int | None = None  # the history entry whose weights early stopping kept (None: the last)
    stopped_after: dict[int, int] = dataclasses.field(default_factory=dict)  # stage -> its last epoch, if stopped
    run: Run = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        if self.stages is None:
            self.stages = plan_pretrain(self.recipe, len(self.split.train))
        self.run = Run(self.recipe, self.backup, self.state, self.verbose, total_epochs=self.epochs)

    @property
    def epochs(self) -> int:
        """The run's epochs: those of its planned stages (one per block for `stacked`, numbered on across them)."""
        return sum(stage.epochs for stage in self.stages)

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


@dataclasses.dataclass(frozen=True)
class Examples:
    """Training examples built batch by batch from the inputs, inside the tf.data map: never held whole.

    `count` examples numbered `0..count-1`; `make(indices)` (TensorFlow ops on a
    1-D int64 tensor) gives the batch of those numbered `indices`. `of(*items)`:
    the rows of arrays or image files, image files decoded in the map (a
    folder streams); a task derives its own from those (`rotation`'s turns).

    Example:

    >>> import numpy as np
    >>> rows = Examples.of(np.arange(6.0), np.arange(6))
    >>> [x.numpy().tolist() for x, _ in rows.in_order(4)]
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0]]
    """

    count: int
    make: Callable[[Any], Any]

    def __len__(self) -> int:
        return self.count

    @classmethod
    def of(cls, *items: Any) -> "Examples":
        """The rows of `items` (arrays or `ImageFiles` of one length): a tuple per batch, or one item alone."""
        import tensorflow as tf

        held = tuple(a if isinstance(a, ImageFiles) else tf.convert_to_tensor(a) for a in items)

        def make(indices):
            batch = tuple(gather_together(held, indices))  # image files: decoded here, in the parallel map
            return batch if len(batch) > 1 else batch[0]

        return cls(len(items[0]), make)

    def in_order(self, batch_size: int):
        """Every example once, in order, in batches (validation, training-health checks)."""
        import tensorflow as tf

        return (tf.data.Dataset.range(self.count).batch(batch_size)
                .map(self.make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def fit_task(job: Job, model: keras.Model, x: Any, y: Any, loss: Any, validation: Any = None,
             metrics: list | None = None, start: int = 0, stage: int = 0, kept: Kept = None,
             epoch_values: dict[str, float] | None = None) -> dict[str, list[float]]:
    """Train `model` on `(x, y)` for the run's epochs `start + 1`..`start + recipe.epochs` through the stage
    runner (`transferkit.training.runner`); the run's history.

    `x` and `y` are arrays or image files, or `x` is `Examples` built in the
    pipeline (then `y` is `None`); `validation` likewise an `(x, y)` pair or `Examples`.
    Each epoch's batches are a function of the seed and the epoch (`epoch_batches`),
    and backups keep `model`'s random states, so a resumed run ends as an uninterrupted
    one would. `stage`: the stage's number in the backups; `kept`: the weights they keep
    (default `model`); `epoch_values`: entries the history gets at every epoch.
    """
    recipe = job.recipe
    if recipe.epochs == 0:
        return job.run.history
    built = isinstance(x, Examples)
    train = x if built else Examples.of(x, y)
    if isinstance(validation, Examples):
        val = validation.in_order(recipe.batch_size) if len(validation) else None
    else:
        val = pipeline(*validation, recipe.batch_size) if validation is not None and len(validation[1]) else None
    in_order = train.in_order(recipe.batch_size) if built else pipeline(x, y, recipe.batch_size)
    sweep = None  # what the LR finder sweeps, for --lr auto
    if recipe.lr == "auto":
        sweep = epoch_batches(train, recipe.batch_size, recipe.seed, range(1)) if built else learning_rate_data(
            x, y, recipe.batch_size)
    done = fit_stage(job.run, Stage(
        f"pretrain {recipe.task}" + (f" block {stage + 1}" if recipe.task == "stacked" else ""), model,
        lambda first: epoch_batches(train, recipe.batch_size, recipe.seed, range(first, start + recipe.epochs)),
        start=start, end=start + recipe.epochs, batches_per_epoch=runs.steps_per_epoch(len(train), recipe.batch_size),
        continuous=True, index=stage, loss=loss, metrics=metrics, learning_rate=recipe.lr,
        lr_data=sweep,
        patience=recipe.patience, validated=val is not None, validation=val, kept=kept, random_state=True,
        epoch_values=epoch_values, unshuffled=in_order if recipe.health_steps else None))
    if done.stopping is not None and done.stopping.stopped_epoch:
        job.stopped_after[stage] = done.stopping.stopped_epoch + 1  # the run's epoch number, as fine-tuning records it
    if done.stopping is not None and done.stopping.best_weights is not None:  # the best epoch's weights came back
        job.kept = len(job.run.history["loss"]) - done.epochs + done.stopping.best_epoch - done.first
    return job.run.history


def epoch_batches(data: tuple[Any, ...] | Examples, batch_size: int, seed: int, epochs: range,
                  drop_remainder: bool = False):
    """The batches of `epochs` one after the other, each epoch a shuffle of `data` seeded by `seed` and its number.

    `data`: arrays or image files (their rows), or `Examples` built in the map.
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

    examples = data if isinstance(data, Examples) else Examples.of(*data)
    count, seed = examples.count, tf.constant(seed, "int64")

    def one_epoch(epoch):
        order = tf.random.experimental.stateless_shuffle(tf.range(count), seed=tf.stack([seed, epoch]))
        return tf.data.Dataset.from_tensor_slices(order).batch(batch_size, drop_remainder)

    return (tf.data.Dataset.from_tensor_slices(np.asarray(epochs, "int64")).flat_map(one_epoch)
            .map(examples.make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE))


def final_metrics(history: dict[str, list[float]], keys: tuple[str, ...] = (), at: int | None = None
                  ) -> dict[str, float]:
    """Each history entry's value (of `keys`, if given) at epoch entry `at`, by default the last: the run's metrics.

    `at` is `Job.kept` when early stopping kept an earlier epoch's weights.
    """
    return {k: float(v[-1 if at is None else at]) for k, v in history.items() if v and (not keys or k in keys)}
