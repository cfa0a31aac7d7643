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
>>> from transferkit.pretraining.run import run_pretrain
>>> result = run_pretrain(Recipe(task="stacked", epochs=5, out="/tmp/enc"))   # doctest: +SKIP
>>> sorted(p.name for p in result.artifact.glob("*.png"))                      # doctest: +SKIP
['loss.png', 'reconstructions.png']
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import keras

from transferkit.store import artifacts
from transferkit.training import runs
from transferkit.store.backup import Backup
from transferkit.data.sources import Data, Split
from transferkit.training.defaults import describe_chosen, resolve_pretrain
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe
from transferkit.training.runtime import is_chief, training_context
from transferkit.pretraining.job import Job, Pretrained
from transferkit.pretraining.autoencoders import train_autoencoder, train_stacked
from transferkit.pretraining.encoder import build_encoder
from transferkit.pretraining.gan import train_gan
from transferkit.pretraining.plan import describe_plan, plan_pretrain
from transferkit.pretraining.pretext import train_pairs, train_rotation


# task -> the function that trains it on a Job
TASKS: dict[str, Callable[[Job], Pretrained]] = {
    "autoencoder": train_autoencoder,
    "denoising": train_autoencoder,
    "stacked": train_stacked,
    "rotation": train_rotation,
    "pairs": train_pairs,
    "gan": train_gan,
}
DECODER_TASKS = ("autoencoder", "denoising", "stacked")


def run_pretrain(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Train the recipe's task on the unlabeled training inputs; save the encoder and pictures.

    Example:

    >>> run_pretrain(Recipe(task="rotation", arch="conv", epochs=5, out="/tmp/enc"))   # doctest: +SKIP

    Raises:
        SettingsError: settings that cannot work for the task (before any training).
    """
    recipe = recipe.validate()
    artifacts.check_out_writable(artifacts.out_dir(recipe, "encoder"))
    with training_context(recipe) as strategy:
        replicas = strategy.num_replicas_in_sync
        if recipe.batch_size % replicas:  # pretrain's --batch-size is the global batch: each device takes a part
            raise SettingsError(f"--batch-size {recipe.batch_size} does not split over the {replicas} devices; "
                                f"expected a multiple of {replicas}. Received: batch_size={recipe.batch_size}")
        return _pretrain(recipe, verbose and is_chief())


def _pretrain(recipe: Recipe, verbose: bool) -> runs.Result:
    data, split = runs.prepare(recipe)
    settings = recipe.run_settings()  # as given: what is chosen from them follows
    recipe, chosen = resolve_pretrain(recipe, len(split.train), data.input_shape)
    runs.print_line(describe_chosen("pretrain", chosen), verbose)
    check_settings(recipe, data, split)
    out = artifacts.out_dir(recipe, "encoder")
    backup = Backup.for_output(out, settings)
    state = backup.state(restart=recipe.restart)
    keras.utils.set_random_seed(recipe.seed)
    x_train = data.x[split.train]
    encoder = build_encoder(data.input_shape, recipe, x_train)
    stages = plan_pretrain(recipe, len(x_train))
    job = Job(recipe, data, split, encoder, verbose, backup, state, stages)
    runs.print_line(f"pretrain: {recipe.task} ({recipe.arch}, {recipe.activation}) on {len(x_train)} unlabeled "
                    f"inputs of {data.spec}; stages {describe_plan(stages)}", verbose)
    if state:
        runs.print_line(f"resuming from the backup in {backup.folder}: epoch {job.run.resume_at + 1} of {job.epochs}",
                        verbose)
    done = TASKS[recipe.task](job)
    done.figures.setdefault("loss.png", _loss_picture(recipe, done.history))

    manifest = runs.base_manifest("encoder", recipe, data, split)
    manifest.update(
        task=recipe.task,
        arch=recipe.arch,
        activation=recipe.activation,
        normalization=dict(zip(("mean", "variance"), runs.channel_stats(x_train))),
        output_shape=list(encoder.output.shape[1:]),
        pictures=sorted(done.figures),
        stages=[{**dataclasses.asdict(s), **({"stopped_after": job.stopped_after[i]} if i in job.stopped_after
                                               else {})} for i, s in enumerate(stages)],
        metrics=done.metrics,
    )
    runs.save_run(out, encoder, recipe.to_toml(), manifest, split, done.history, figures=done.figures)
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


def _loss_picture(recipe: Recipe, history: dict[str, list[float]]):
    from transferkit.store.pictures import loss_figure

    blocks = history.get("block", [])
    bands = [i for i in range(1, len(blocks)) if blocks[i] != blocks[i - 1]]
    return loss_figure({k: v for k, v in history.items() if k != "block"}, bands=bands,
                       title=f"pretrain --task {recipe.task}")
