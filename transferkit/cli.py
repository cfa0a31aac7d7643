"""The `transferkit` command line: flags mapped onto the Python API.

TensorFlow is imported inside the commands, so `transferkit --help` is instant.
Usage errors exit with status 2, runtime errors with status 1, each with one
line on stderr (`--debug` shows the traceback).
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from transferkit.commands.diagnose_cli import diagnose
from transferkit.errors import SettingsError, TransferkitError
from transferkit.pieces.optimizers import OPTIMIZERS
from transferkit.recipe import GRAPHS, NOISE_KINDS, PREPROCESS, RESIZE_MODES, SCHEDULES, SEMI_SUPERVISED, TASKS
from transferkit.training.runtime import BACKENDS, DEVICES, PRECISIONS, STRATEGIES, choose_backend


def _common_options(f: Callable) -> Callable:
    options = [
        click.option("--recipe", type=click.Path(dir_okay=False), help="Recipe TOML file; flags override it."),
        click.option("--data", help="Data spec: digits, npz:PATH, dir:PATH or tfds:NAME[:SPLIT]."),
        click.option("--seed", type=int, help="Seed of initialization, shuffling and the label subset."),
        click.option("--split-seed", type=int, help="Seed of the train/validation/test split."),
        click.option("--label-fraction", type=float, help="Fraction of training examples whose labels are kept."),
        click.option("--image-size", type=int, help="Resize dir: and tfds: images to this square size "
                                                    "(for dir: images of mixed sizes, the median size by default)."),
        click.option("--resize", type=click.Choice(RESIZE_MODES),
                     help="How images of another aspect ratio reach the size: stretch, crop (the center) "
                          "or pad (with black)."),
        click.option("--skip-bad-files/--no-skip-bad-files", default=None,
                     help="Skip dir: files that cannot be decoded, counted and listed, instead of stopping."),
        click.option("--epochs", type=int, help="Most epochs of training (finetune: of each unfreezing stage); "
                                                "early stopping may end it sooner."),
        click.option("--patience", type=int, help="Stop a stage once its loss (val_loss when the validation part "
                                                  "has an example of every class) has not improved for N epochs, "
                                                  "keeping its best epoch's weights (0: off)."),
        click.option("--batch-size", type=int),
        click.option("--lr", help="Learning rate (the peak, for onecycle), or auto: the LR finder's valley."),
        click.option("--schedule", type=click.Choice(SCHEDULES), help="Learning-rate schedule."),
        click.option("--plateau-factor", type=float, help="--schedule plateau: multiply the rate by this."),
        click.option("--plateau-patience", type=int, help="--schedule plateau: epochs without progress."),
        click.option("--optimizer", type=click.Choice(OPTIMIZERS), help="The optimizer (Keras's, by its name)."),
        click.option("--activation", help="selu, relu, elu, gelu, swish, mish, tanh, ..."),
        click.option("--batchnorm", type=click.Choice(["none", "before", "after"])),
        click.option("--dropout", type=float, help="Dropout rate (alpha dropout for SELU)."),
        click.option("--mc-dropout/--no-mc-dropout", default=None, help="Dropout that stays on at inference."),
        click.option("--max-norm", type=float, help="Max-norm constraint on each kernel."),
        click.option("--clipnorm", type=float, help="Clip each gradient to this norm."),
        click.option("--clipvalue", type=float, help="Clip each gradient component to [-v, v]."),
        click.option("--device", type=click.Choice(DEVICES), help="Where to train."),
        click.option("--strategy", type=click.Choice(STRATEGIES),
                     help="tf.distribute strategy (auto: TPU if found, mirrored with 2+ GPUs, else default)."),
        click.option("--precision", type=click.Choice(PRECISIONS), help="float32 or mixed precision."),
        click.option("--jit-compile/--no-jit-compile", default=None, help="XLA-compile the training step."),
        click.option("--health-every", type=int,
                     help="Check gradients and activations every N steps; warn once per problem (0: off)."),
        click.option("--tensorboard", type=click.Path(file_okay=False),
                     help="Write the training curves, and the training-health figures (checked every 50 steps), "
                          "for TensorBoard here."),
        click.option("--backup-every", type=int, help="Also back up every N steps (always at each epoch end)."),
        click.option("--restart/--resume", default=None,
                     help="Discard a backup of an interrupted run instead of continuing it."),
        click.option("--out", type=click.Path(file_okay=False), help="Artifact folder."),
        click.option("--name", help="Artifact name under saved_models/."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def _handle_errors(f: Callable) -> Callable:
    """Turn our errors into one line and an exit status: 2 for settings, 1 for failures."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            return f(*args, **kwargs)
        except SettingsError as err:
            if ctx.obj.get("debug"):
                raise
            click.echo(f"Error: {err}", err=True)
            ctx.exit(2)
        except (TransferkitError, OSError, ValueError, RuntimeError) as err:
            if ctx.obj.get("debug"):
                raise
            message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            click.echo(f"Error: {message}", err=True)
            ctx.exit(1)

    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.option("--backend", type=click.Choice(BACKENDS),
              help="Keras backend to compute with (sets KERAS_BACKEND; default: KERAS_BACKEND, else tensorflow).")
@click.version_option(package_name="transferkit")
@click.pass_context
def cli(ctx: click.Context, debug: bool, backend: str | None) -> None:
    """Transfer learning for Keras: pretrain on unlabeled data, fine-tune on few labels, export."""
    ctx.ensure_object(dict)["debug"] = debug
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend:
        try:
            choose_backend(backend)
        except SettingsError as err:
            click.echo(f"Error: {err}", err=True)
            ctx.exit(2)


@cli.command()
@_common_options
@click.option("--task", type=click.Choice(TASKS), help="Pretraining task.")
@click.option("--arch", type=click.Choice(["dense", "conv"]), help="Encoder architecture.")
@click.option("--units", help="Dense units per block, bottom to top, e.g. 128,64,32.")
@click.option("--filters", help="Conv filters per block, e.g. 16,32,32.")
@click.option("--noise", type=float, help="Denoising noise: std as a fraction of the data's (gaussian), or rate.")
@click.option("--noise-kind", type=click.Choice(NOISE_KINDS), help="Denoising noise: gaussian or dropout.")
@click.option("--tied-weights/--no-tied-weights", default=None, help="Dense decoder reuses the encoder's kernels.")
@_handle_errors
def pretrain(recipe: str | None, **settings: Any) -> None:
    """Pretrain an encoder on unlabeled inputs and save it."""
    from transferkit.api import pretrain as run

    run(recipe, **settings)


def _finetune_options(f: Callable) -> Callable:
    options = [
        click.option("--from", "from_", type=click.Path(file_okay=False), help="A saved encoder artifact."),
        click.option("--backbone", help="A Keras Applications backbone: mobilenetv2, efficientnetb0, resnet50, densenet121, vgg16, "
                                               "convnexttiny, ... (transferkit.BACKBONES)."),
        click.option("--weights", help="Backbone weights: imagenet, none or a weights file."),
        click.option("--base", type=click.Path(dir_okay=False),
                     help="Any Keras model file (.keras, or a legacy .h5) as the base, cut before its classifier."),
        click.option("--cut", help="--base: the layer its body ends with, by name or negative index "
                                   "(-2: all but the last layer)."),
        click.option("--preprocess", type=click.Choice(PREPROCESS),
                     help="--base: what its weights expect of 0..255 pixels: none, scale:1/255 (to [0, 1]), "
                          "tf (to [-1, 1]), imagenet-caffe (BGR minus the means), imagenet-torch (standardized)."),
        click.option("--head-epochs", type=int, help="Most epochs of stage 1 (head only, base frozen)."),
        click.option("--head-patience", type=int, help="The older name of --patience, for head-only stages."),
        click.option("--unfreeze-top", type=int, help="Blocks of the base to unfreeze in stage 2 (0: head only)."),
        click.option("--unfreeze-schedule", help="Stages KEYWORD:EPOCHS, e.g. head:2,top2:3,top4:3,all:5."),
        click.option("--gradual/--no-gradual", default=None,
                     help="ULMFiT's gradual unfreezing: one more block per stage (of --epochs each), top first."),
        click.option("--finetune-lr-factor", type=float, help="Learning rate of unfreezing stages = lr x this."),
        click.option("--label-smoothing", type=float,
                     help="Spread this much of each target's probability over every class (Szegedy et al. 2016)."),
        click.option("--lr-decay", type=float, help="Each block below the top one learns at 1/D of the one above "
                                                    "(discriminative fine-tuning; ULMFiT uses 2.6)."),
        click.option("--train-batchnorm/--freeze-batchnorm", default=None,
                     help="Let BatchNorm in unfrozen blocks train (frozen: in inference mode)."),
        click.option("--cache-features/--no-cache-features", default=None,
                     help="Train head-only stages on base outputs computed once (not with --augment, --mixup or "
                          "--cutmix, which change the inputs every epoch: those run the base every epoch)."),
    ]
    for option in reversed(options):
        f = option(f)
    return f


@cli.command()
@_common_options
@_finetune_options
@click.option("--semi-supervised", type=click.Choice(SEMI_SUPERVISED),
              help="Learn from the unlabeled training examples too: self-training (pseudo) or label "
                   "propagation over the base's features (propagate).")
@click.option("--propagate-on", type=click.Choice(GRAPHS),
              help="The kNN graph of propagate: on the base's features or the raw inputs.")
@click.option("--pseudo-rounds", type=int, help="Rounds of pseudo-labeling.")
@click.option("--pseudo-threshold", type=float,
              help="Keep only pseudo-labels at least this probable, in (0, 1) (default: top-k alone).")
@click.option("--augment", help="Random image augmentation inside the model, in training only (serve and "
                                "predict never see it): light (rotate:10,zoom:0.1,translate:0.1), medium "
                                "(flip,rotate:15,zoom:0.15,translate:0.1,contrast:0.2) or a comma list of flip, "
                                "rotate:DEG, zoom:F, translate:F, contrast:F, randaugment. Head stages then run "
                                "the frozen base every epoch instead of on cached outputs.")
@click.option("--mixup", type=float, help="MixUp each training batch with this alpha (Beta(alpha, alpha) "
                                          "weights; 0: off; images only; also uncaches head stages).")
@click.option("--cutmix", type=float, help="CutMix each training batch: its factor in [0, 1] (0: off; images "
                                           "only; with --mixup each batch gets one of the two).")
@click.option("--class-weight", help="Per-class loss weights: balanced (n / (classes x n_class)), none, or a JSON "
                                     "file of class name -> weight.")
@click.option("--ema", type=float, help="Keep an exponential moving average of the weights with this decay, e.g. "
                                        "0.999; it is validated and saved instead of the last weights.")
@_handle_errors
def finetune(recipe: str | None, **settings: Any) -> None:
    """Fine-tune a new head (then the top blocks) on a few labels; print the test accuracy."""
    from transferkit.api import finetune as run

    run(recipe, **settings)


@cli.command("lr-find")
@_common_options
@_finetune_options
@click.option("--stage", "stage_name", help="The stage to test, e.g. head or top2 (default: the first).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the loss curve with the suggestions (PNG).")
@click.option("--start-lr", type=float, default=1e-7, show_default=True)
@click.option("--end-lr", type=float, default=10.0, show_default=True)
@click.option("--num-steps", type=int, default=100, show_default=True)
@_handle_errors
def lr_find(recipe: str | None, stage_name: str | None, plot: str | None, start_lr: float, end_lr: float,
            num_steps: int, **settings: Any) -> None:
    """The LR range test on the model finetune would train; prints valley, minimum/10 and steep."""
    from transferkit.api import resolve_recipe
    from transferkit.commands.learning_rates import run_lr_find

    run_lr_find(resolve_recipe(recipe, "finetune", settings), stage_name, plot, start_lr, end_lr, num_steps)


@cli.command()
@_common_options
@_finetune_options
@click.option("--for", "command", type=click.Choice(["finetune", "pretrain"]), default="finetune",
              show_default=True, help="Which command's schedule to draw.")
@click.option("--plot", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@_handle_errors
def schedule(recipe: str | None, command: str, plot: str, **settings: Any) -> None:
    """Draw the learning rate and momentum a recipe would use, step by step, without training."""
    from transferkit.api import resolve_recipe
    from transferkit.commands.learning_rates import plot_schedule, schedule_curve

    resolved = resolve_recipe(recipe, command, settings)
    curve = schedule_curve(resolved, command)
    plot_schedule(curve, plot, title=f"{command}: {resolved.schedule} schedule, {len(curve.lrs)} steps")
    click.echo(f"schedule: {len(curve.lrs)} steps in {len(curve.stage_starts)} stage(s), learning rate "
               f"{curve.lrs.min():.3g} to {curve.lrs.max():.3g}; plot written to {plot}")


_TTA_HELP = ("Test-time augmentation: also average the probabilities over the input and N-1 augmented copies "
             "(the model's own --augment, else horizontal flips; dropout off), reported beside the plain figures "
             "(1: off; images only).")


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), help="SavedModel folder (default MODEL_DIR/serving).")
@click.option("--mc-samples", type=click.IntRange(min=2), default=30, show_default=True,
              help="MC dropout samples per example in the serve_mc endpoint (models with dropout).")
@_handle_errors
def export(model_dir: str, out: str | None, mc_samples: int) -> None:
    """Export MODEL_DIR as a SavedModel with `serve` (and `serve_mc`), and check it."""
    from transferkit.api import export as run

    run(model_dir, out, mc_samples=mc_samples)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", help="Data spec to evaluate on (default: the artifact's test split).")
@click.option("--mc-samples", type=click.IntRange(min=0), default=0,
              help="Also evaluate MC dropout predictions with this many samples.")
@click.option("--top-k", type=int, help="Report the top-K accuracy (default 5 with more than 5 classes, else none).")
@click.option("--plots", type=click.Path(), help="Write confusion.png (and top_losses.png for images) here.")
@click.option("--output", type=click.Path(), help="Write the whole report to this JSON file.")
@click.option("--tta", type=int, default=1, show_default=True, help=_TTA_HELP)
@_handle_errors
def evaluate(model_dir: str, data: str | None, mc_samples: int, top_k: int | None, plots: str | None,
             output: str | None, tta: int) -> None:
    """Accuracy, per-class figures, confusion and calibration of MODEL_DIR on its test split (or on --data)."""
    from transferkit.api import evaluate as run

    run(model_dir, data, mc_samples=mc_samples, top_k=top_k, plots=plots, output=output, tta=tta)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--mc-samples", type=click.IntRange(min=0), default=0,
              help="MC dropout samples per example; adds std, entropy and mutual information.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the rows to a .csv or .json file.")
@click.option("--tta", type=int, default=1, show_default=True, help=_TTA_HELP)
@_handle_errors
def predict(model_dir: str, inputs: tuple[str, ...], mc_samples: int, output: str | None, tta: int) -> None:
    """Class and probability for INPUTS: image files, or a data spec (npz:PATH, dir:PATH)."""
    from transferkit.api import predict as run

    run(model_dir, list(inputs), mc_samples=mc_samples, output=output, tta=tta)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False), required=False)
@click.option("--base", type=click.Path(dir_okay=False),
              help="Instead of MODEL_DIR: a Keras model file's layers, its cut and its blocks, as --base sees them.")
@click.option("--cut", help="With --base: the layer its body ends with, by name or negative index.")
@_handle_errors
def inspect(model_dir: str | None, base: str | None, cut: str | None) -> None:
    """The freeze audit of MODEL_DIR: per block, what trains, BatchNorm's mode, parameters, lr factor."""
    if (model_dir is None) == (base is None):
        raise SettingsError("inspect takes exactly one of MODEL_DIR (an artifact) or --base FILE (a model file).")
    if cut is not None and base is None:
        raise SettingsError(f"--cut {cut!r} goes with --base FILE; expected no --cut with MODEL_DIR.")
    if base is not None:
        from transferkit.finetuning.bases import inspect_base

        inspect_base(base, cut)
        return
    from transferkit.pieces.freezing import inspect as run

    run(model_dir)




# what an unset setting becomes (transferkit.training.defaults), for --help
_AUTO = {
    "epochs": "auto: about 1500 optimizer steps to pretrain, 300 per unfreezing stage, at least 5 epochs",
    "head_epochs": "auto: about 600 optimizer steps, at least 5 epochs",
    "lr": "0.01 to fine-tune, 0.001 to pretrain, 0.0002 for --task gan",
    "unfreeze_top": "every block",
    "finetune_lr_factor": "0.1 on an encoder, 0.01 on a backbone",
    "split_seed": "--seed, or the encoder's with --from",
    "head_patience": "--patience",
    "cut": "after the last global pooling or Flatten layer, else before the last Dense",
    "preprocess": "none: the base takes 0..255 pixels",
    "ema": "off",
    "out": "saved_models/NAME",
    "name": "from the data spec",
}


def _show_recipe_defaults(group: click.Group) -> None:
    """Show each setting's default in --help: the Recipe's value, or what an unset one becomes."""
    import dataclasses

    from transferkit.recipe import Recipe

    defaults = {f.name: f.default for f in dataclasses.fields(Recipe)}
    for command in group.commands.values():
        for param in command.params:
            if not isinstance(param, click.Option) or param.name not in defaults or param.show_default:
                continue
            value = defaults[param.name]
            if param.name in _AUTO:
                param.show_default = _AUTO[param.name]
            elif isinstance(value, bool):
                param.show_default = param.opts[0].lstrip("-") if value else param.secondary_opts[0].lstrip("-")
            elif isinstance(value, tuple):
                param.show_default = ",".join(str(v) for v in value)
            elif value is not None:
                param.show_default = str(value)


cli.add_command(diagnose)
_show_recipe_defaults(cli)


def main() -> None:
    cli(prog_name="transferkit", obj={})


if __name__ == "__main__":
    sys.exit(main())
