"""The `transferkit` command line: flags mapped onto the Python API.

TensorFlow is imported inside the commands, so `transferkit --help` is instant.
Usage errors exit with status 2, runtime errors with status 1, each with one
line on stderr (`--debug` shows the traceback).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from transferkit.commands.export_formats import FORMATS, QUANTIZE, parse_formats
from transferkit.errors import SettingsError, TransferkitError
from transferkit.native_logs import start_backend
from transferkit.recipe import Recipe, check_value
from transferkit.training.runtime import BACKENDS, choose_backend
from transferkit.settings import Setting, describe, flag_name


def recipe_options(command: str) -> Callable[[Callable], Callable]:
    """Click options for every Recipe setting `command` takes, generated from the fields' `Setting` metadata.

    Each option's default stays `None` (a flag not given leaves the recipe file's
    value or the Recipe's default); `--help` shows the Recipe's default, or what
    an unset one becomes. `--recipe FILE` comes first.
    """

    def decorate(f: Callable) -> Callable:
        options = [click.option("--recipe", type=click.Path(dir_okay=False),
                                help="Recipe TOML file; flags override it.")]
        options += [_option(field, command) for field in dataclasses.fields(Recipe)
                    if command in describe(field).commands]
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


class RecipeOption(click.Option):
    """A Recipe setting's option: its shown default written as is (`[default: 0.1]`, not Click's `[default: (0.1)]`).

    The option's own default stays None, so a flag not given leaves the recipe
    file's value; what `--help` shows is the Recipe's default, as a string.
    """

    def get_help_extra(self, ctx: click.Context) -> dict[str, Any]:
        extra = dict(super().get_help_extra(ctx))
        if isinstance(self.show_default, str):
            extra["default"] = self.show_default
        return extra


def _checked(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
    """A Recipe setting's flag checked as it is read (its `Setting`), before anything is imported or loaded."""
    if value is not None:
        try:
            check_value(param.name, value, label=param.opts[0])
        except SettingsError as err:
            raise click.UsageError(str(err), ctx) from None
    return value


def _option(field: dataclasses.Field, command: str) -> Callable:
    meta, flag = describe(field), flag_name(field)
    default = field.default
    shown = meta.auto_for(command) if default is None else _shown(default, flag, meta)
    kwargs: dict[str, Any] = {"help": meta.help, "show_default": shown or False, "cls": RecipeOption,
                              "callback": _checked}
    if isinstance(default, bool):
        off = meta.off or "--no-" + flag[2:]
        return click.option(f"{flag}/{off}", field.name, default=None, **kwargs)
    if meta.choices is not None:
        kwargs["type"] = click.Choice(meta.choices)
    elif meta.kind in ("path", "folder"):
        kwargs["type"] = click.Path(dir_okay=meta.kind == "folder", file_okay=meta.kind == "path")
    elif meta.kind == "list":
        kwargs["metavar"] = "N,N,..."
    elif isinstance(default, int) or field.type in ("int | None", "int"):
        kwargs["type"] = int
    elif isinstance(default, float) or field.type in ("float | None", "float"):
        kwargs["type"] = float
    return click.option(flag, field.name, **kwargs)


def _shown(default: Any, flag: str, meta: Setting) -> str:
    if isinstance(default, bool):
        return (flag if default else meta.off or "--no-" + flag[2:]).lstrip("-")
    if isinstance(default, tuple):
        return ",".join(str(v) for v in default)
    return str(default)


def handle_errors(f: Callable) -> Callable:
    """Start the backend quietly, then turn our errors into one line and an exit status: 2 for settings, 1 for
    failures."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        ctx = click.get_current_context()
        try:
            # the backend's native start-up lines hidden (all shown with --debug or TF_CPP_MIN_LOG_LEVEL=0)
            start_backend(quiet=not ctx.obj.get("debug") and os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0")
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


def recipe_checked(command: str, needs_base: bool = False) -> Callable[[Callable], Callable]:
    """Resolve the recipe file and flags and check them together (`Recipe.validate`; with `needs_base`, that a
    base is named) before the backend starts: a settings error in a fraction of a second, as a usage error.

    An error of another kind (a recipe file that cannot be read) is left to the command, which reports it.
    """

    def decorate(f: Callable) -> Callable:
        @functools.wraps(f)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            from transferkit.api import resolve_recipe

            settings = {k: v for k, v in kwargs.items() if k in Recipe.__dataclass_fields__}
            try:
                recipe = resolve_recipe(kwargs.get("recipe"), command, settings)
                if needs_base:
                    recipe.check_base()
            except SettingsError as err:
                raise click.UsageError(str(err), click.get_current_context()) from None
            except (OSError, ValueError):  # the command reads the file again and reports it in its words
                pass
            return f(*args, **kwargs)

        return wrapper

    return decorate


class Commands(click.Group):
    """The command group, whose usage errors (a bad flag or value) are one line on stderr with status 2.

    Click prints a usage error as the command's usage, a hint and the error;
    here it is the error alone, as every other error of transferkit is.
    """

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            done = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as err:  # the group's help, as Click shows it
            err.show()
            sys.exit(err.exit_code)
        except click.UsageError as err:
            hint = f" (see: {err.ctx.command_path} --help)" if err.ctx is not None else ""
            click.echo(f"Error: {err.format_message()}{hint}", err=True)
            sys.exit(err.exit_code)
        except click.ClickException as err:
            err.show()
            sys.exit(err.exit_code)
        except click.Abort:
            click.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(done if isinstance(done, int) else 0)


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
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
@recipe_options("pretrain")
@recipe_checked("pretrain")
@handle_errors
def pretrain(recipe: str | None, **settings: Any) -> None:
    """Pretrain an encoder on unlabeled inputs and save it."""
    from transferkit.api import pretrain as run

    run(recipe, **settings)


@cli.command()
@recipe_options("finetune")
@recipe_checked("finetune", needs_base=True)
@handle_errors
def finetune(recipe: str | None, **settings: Any) -> None:
    """Fine-tune a new head (then the top blocks) on a few labels; print the test accuracy."""
    from transferkit.api import finetune as run

    run(recipe, **settings)


@cli.command("lr-find")
@recipe_options("lr-find")
@click.option("--stage", "stage_name", help="The stage to test, e.g. head or top2 (default: the first).")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write the loss curve with the suggestions (PNG).")
@click.option("--start-lr", type=float, default=1e-7, show_default=True)
@click.option("--end-lr", type=float, default=10.0, show_default=True)
@click.option("--num-steps", type=int, default=100, show_default=True)
@handle_errors
def lr_find(recipe: str | None, stage_name: str | None, plot: str | None, start_lr: float, end_lr: float,
            num_steps: int, **settings: Any) -> None:
    """The LR range test on the model finetune would train; prints valley, minimum/10 and steep."""
    from transferkit.api import find_lr

    find_lr(recipe, stage=stage_name, plot=plot, start_lr=start_lr, end_lr=end_lr, num_steps=num_steps, **settings)


@cli.command()
@recipe_options("schedule")
@click.option("--for", "command", type=click.Choice(["finetune", "pretrain"]), default="finetune",
              show_default=True, help="Which command's schedule to draw.")
@click.option("--plot", type=click.Path(dir_okay=False), required=True, help="PNG to write.")
@handle_errors
def schedule(recipe: str | None, command: str, plot: str, **settings: Any) -> None:
    """Draw the learning rate and momentum a recipe would use, step by step, without training."""
    from transferkit.api import plot_schedule

    plot_schedule(plot, recipe, command=command, **settings)


# the help of the Recipe's setting that pretrain and finetune take, for evaluate and predict
_SKIP_HELP = describe(Recipe.__dataclass_fields__["skip_bad_files"]).help
_TTA_HELP = ("Test-time augmentation: also average the probabilities over the input and N-1 augmented copies "
             "(the model's own --augment, else horizontal flips; dropout off), reported beside the plain figures "
             "(1: off; images only).")


def _parse_formats(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, ...]:
    try:
        return parse_formats(value)
    except SettingsError as err:
        raise click.BadParameter(str(err)) from None


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--out", type=click.Path(file_okay=False), show_default="MODEL_DIR/serving",
              help="SavedModel folder; ONNX goes to OUT-onnx, LiteRT to OUT-litert (OUT-litert-QUANTIZE when "
                   "quantized).")
@click.option("--format", "formats", default="savedmodel", show_default=True, callback=_parse_formats,
              help=f"Comma list of {', '.join(FORMATS)}; each is reloaded in its own runtime and checked.")
@click.option("--quantize", type=click.Choice(QUANTIZE),
              help="Quantize the LiteRT export: dynamic (int8 weights), float16, or int8 (calibrated on the "
                   "training split); checked by class agreement and test accuracy.")
@click.option("--mc-samples", type=click.IntRange(min=2), default=30, show_default=True,
              help="MC dropout samples per example in the serve_mc endpoint (models with dropout; ONNX and "
                   "LiteRT: a fixed ensemble of this many dropout masks).")
@handle_errors
def export(model_dir: str, out: str | None, formats: tuple[str, ...], quantize: str | None, mc_samples: int) -> None:
    """Export MODEL_DIR as a SavedModel (and ONNX, LiteRT) with `serve` (and `serve_mc`), and check each."""
    from transferkit.api import export as run

    run(model_dir, out, mc_samples=mc_samples, formats=formats, quantize=quantize)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.option("--data", help="Data spec to evaluate on (default: the artifact's test split).")
@click.option("--mc-samples", type=click.IntRange(min=0), default=0,
              help="Also evaluate MC dropout predictions with this many samples.")
@click.option("--top-k", type=int, help="Report the top-K accuracy (default 5 with more than 5 classes, else none).")
@click.option("--plots", type=click.Path(), help="Write confusion.png (and top_losses.png for images) here.")
@click.option("--output", type=click.Path(), help="Write the whole report to this JSON file.")
@click.option("--tta", type=int, default=1, show_default=True, help=_TTA_HELP)
@click.option("--skip-bad-files", is_flag=True, help=_SKIP_HELP)
@handle_errors
def evaluate(model_dir: str, data: str | None, mc_samples: int, top_k: int | None, plots: str | None,
             output: str | None, tta: int, skip_bad_files: bool) -> None:
    """Accuracy, per-class figures, confusion and calibration of MODEL_DIR on its test split (or on --data)."""
    from transferkit.api import evaluate as run

    run(model_dir, data, mc_samples=mc_samples, top_k=top_k, plots=plots, output=output, tta=tta,
        skip_bad_files=skip_bad_files)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False))
@click.argument("inputs", nargs=-1, required=True)
@click.option("--mc-samples", type=click.IntRange(min=0), default=0,
              help="MC dropout samples per example; adds std, entropy and mutual information.")
@click.option("--output", type=click.Path(dir_okay=False), help="Write the rows to a .csv or .json file.")
@click.option("--tta", type=int, default=1, show_default=True, help=_TTA_HELP)
@click.option("--skip-bad-files", is_flag=True, help=_SKIP_HELP)
@handle_errors
def predict(model_dir: str, inputs: tuple[str, ...], mc_samples: int, output: str | None, tta: int,
            skip_bad_files: bool) -> None:
    """Class and probability for INPUTS: image files, or a data spec (npz:PATH, dir:PATH)."""
    from transferkit.api import predict as run

    run(model_dir, list(inputs), mc_samples=mc_samples, output=output, tta=tta, skip_bad_files=skip_bad_files)


@cli.command()
@click.argument("model_dir", type=click.Path(file_okay=False), required=False)
@click.option("--base", type=click.Path(dir_okay=False),
              help="Instead of MODEL_DIR: a Keras model file's layers, its cut and its blocks, as --base sees them.")
@click.option("--cut", help="With --base: the layer its body ends with, by name or negative index.")
@click.option("--backbone", help="Instead of MODEL_DIR: a backbone's layers and blocks (a registry name, hub:PRESET).")
@handle_errors
def inspect(model_dir: str | None, base: str | None, cut: str | None, backbone: str | None) -> None:
    """The freeze audit of MODEL_DIR: per block, what trains, BatchNorm's mode, parameters, lr factor."""
    from transferkit.api import inspect as run

    run(model_dir, base=base, cut=cut, backbone=backbone)


@cli.command()
@click.argument("model", type=click.Path())
@click.option("--data", help="Data spec (digits, npz:PATH, dir:PATH, tfds:NAME). Default for an artifact: the "
                             "training split of its data; required for a .keras file.")
@click.option("--batches", type=int, default=4, show_default=True, help="Batches to run forward and backward.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Examples per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the examples drawn.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write per-layer gradient and activation plots "
                                                               "to this PNG.")
@handle_errors
def diagnose(model: str, data: str | None, batches: int, batch_size: int, seed: int, plot: str | None) -> None:
    """Per-layer activations and gradients of MODEL (an artifact folder or a .keras file) on a few batches,
    with verdicts (vanishing/exploding gradients, saturation, dead units, broken self-normalization)
    and the remedies that apply."""
    from transferkit.api import diagnose as run

    report = run(model, data, batches=batches, batch_size=batch_size, seed=seed)
    click.echo(report.format())
    if plot:
        click.echo(f"plot written to {report.plot(plot)}")


def main() -> None:
    cli(prog_name="transferkit", obj={})


if __name__ == "__main__":
    sys.exit(main())
