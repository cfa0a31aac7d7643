"""The Python API: the same settings as the CLI flags, as keyword arguments.

Example:

>>> import transferkit as tk
>>> enc = tk.pretrain(recipe="recipes/digits.toml")                        # doctest: +SKIP
>>> clf = tk.finetune(recipe="recipes/digits.toml", from_=enc.artifact,
...                   label_fraction=0.05, unfreeze_top=2)                  # doctest: +SKIP
>>> clf.metrics["test_accuracy"]                                           # doctest: +SKIP
0.93
>>> tk.export(clf.artifact)                                                # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferkit.data.progress import quiet
from transferkit.recipe import Recipe
from transferkit.training.runs import Result


def resolve_recipe(recipe: str | Path | Recipe | None, command: str, settings: dict[str, Any]) -> Recipe:
    """The recipe file's (or object's) settings with `settings` over them; `None` values are ignored."""
    if recipe is None:
        base = Recipe()
    elif isinstance(recipe, Recipe):
        base = recipe
    else:
        base = Recipe.load(recipe, command)
    return base.replace(**{k: (str(v) if isinstance(v, Path) else v) for k, v in settings.items()})


def pretrain(recipe: str | Path | Recipe | None = None, *, verbose: bool = True, **settings: Any) -> Result:
    """Pretrain an encoder on the unlabeled training inputs and save it.

    Args:
        recipe: Optional path of a recipe TOML file (its `[pretrain]` table
            applies), or a `Recipe`.
        verbose: Bool. Print progress (progress bars included). Defaults to `True`.
        **settings: Any `Recipe` field (`data`, `task`, `arch`, `activation`,
            `epochs`, `seed`, `out`, ...), over the recipe's values.

    Returns:
        A `Result` with the encoder, history, metrics and artifact folder.
    """
    from transferkit.pretraining.run import run_pretrain

    with quiet(not verbose):  # the passes over the data show no progress bar either
        return run_pretrain(resolve_recipe(recipe, "pretrain", settings), verbose=verbose)


def finetune(recipe: str | Path | Recipe | None = None, *, verbose: bool = True, **settings: Any) -> Result:
    """Fine-tune a classifier on a saved encoder (`from_=`), a backbone (`backbone=`) or a model file (`base=`).

    Args:
        recipe: Optional path of a recipe TOML file (its `[finetune]` table
            applies), or a `Recipe`.
        verbose: Bool. Print progress (progress bars included). Defaults to `True`.
        **settings: Any `Recipe` field (`from_`, `backbone`, `weights`, `base`, `cut`, `preprocess`,
            `label_fraction`, `unfreeze_top`, `head_epochs`, `epochs`, `lr`, `augment`, `mixup`, `cutmix`,
            `class_weight`, `ema`, ...).

    Returns:
        A `Result` with the classifier, history, test metrics and artifact folder.
    """
    from transferkit.finetuning.run import run_finetune

    with quiet(not verbose):
        return run_finetune(resolve_recipe(recipe, "finetune", settings), verbose=verbose)


def export(model_dir: str | Path, out: str | Path | None = None, *, mc_samples: int = 30,
           formats: str | Sequence[str] = "savedmodel", quantize: str | None = None, verbose: bool = True) -> Result:
    """Export an artifact (SavedModel at `model_dir/serving`; `formats` adds ONNX and LiteRT beside it) and check it.

    Models with dropout also get a `serve_mc` endpoint of `mc_samples` MC dropout samples
    (in ONNX and LiteRT a fixed ensemble of `mc_samples` dropout masks). `quantize`
    (`dynamic`, `float16`, `int8`) quantizes the LiteRT export. See `commands.export.run_export`.
    """
    from transferkit.commands.export import run_export

    return run_export(model_dir, out, mc_samples=mc_samples, formats=formats, quantize=quantize, verbose=verbose)


def evaluate(model_dir: str | Path, data: str | None = None, *, mc_samples: int = 0, top_k: int | None = None,
             plots: str | Path | None = None, output: str | Path | None = None, tta: int = 1,
             verbose: bool = True, skip_bad_files: bool = False) -> Result:
    """How well a saved classifier does on its test split (or on `data`), and where it fails.

    Args:
        model_dir: Path of a classifier artifact.
        data: Optional data spec. Defaults to the artifact's test split.
        mc_samples: Integer. Also evaluate MC dropout predictions with this many samples (0: no). Defaults to `0`.
        top_k: Optional integer. Top-k accuracy to report. Defaults to 5 with more than 5 classes, else none.
        plots: Optional folder to write `confusion.png` (and `top_losses.png` for images) into. Defaults to `None`.
        output: Optional `.json` file for the whole report. Defaults to `None`.
        tta: Integer >= 1. Also evaluate test-time augmentation: the mean probabilities over each input and
            `tta - 1` augmented copies (the model's own augmentation, else horizontal flips). Defaults to `1` (off).
        verbose: Bool. Print the report. Defaults to `True`.
        skip_bad_files: Bool. Skip `dir:` files that cannot be decoded instead of stopping. Defaults to `False`.

    Returns:
        A `Result` (an `evaluation.Evaluation`) whose `metrics` hold accuracy,
        balanced accuracy, NLL, ECE, macro and weighted F1 (and top-k), and whose
        `report` holds everything: per-class figures, confusion matrix, most-confused pairs.

    Raises:
        SettingsError: A bad artifact, data, `top_k`, `mc_samples`, `plots` or `output`.
    """
    from transferkit.commands.evaluate import run_evaluate

    with quiet(not verbose):
        return run_evaluate(model_dir, data, mc_samples=mc_samples, top_k=top_k, plots=plots, output=output,
                            tta=tta, verbose=verbose, skip_bad_files=skip_bad_files)


def predict(model_dir: str | Path, inputs: list[str] | str, *, mc_samples: int = 0,
            output: str | Path | None = None, tta: int = 1, verbose: bool = True,
            skip_bad_files: bool = False) -> list[dict[str, Any]]:
    """Predicted class and probability (and MC dropout uncertainty) for image files or a data spec.

    `tta` > 1 adds `tta_class` and `tta_probability`: the mean over each input and `tta - 1` augmented copies.
    `skip_bad_files`: files that cannot be decoded are left out (and listed) instead of stopping.
    """
    from transferkit.commands.predict import run_predict

    with quiet(not verbose):
        return run_predict(model_dir, [inputs] if isinstance(inputs, str) else list(inputs), mc_samples=mc_samples,
                           output=output, tta=tta, verbose=verbose, skip_bad_files=skip_bad_files)


def find_lr(recipe: str | Path | Recipe | None = None, *, stage: str | None = None, plot: str | Path | None = None,
            start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, verbose: bool = True,
            **settings: Any):
    """The LR range test (Smith 2015, fastai's `lr_find`) on the classifier `finetune` would train.

    The model is frozen as in `stage` (default: the first, the head); the loss is
    recorded while the rate grows from `start_lr` to `end_lr` over `num_steps` steps.

    Args:
        recipe, **settings: As for `finetune`.
        stage: Optional stage name (`head`, `top2`, ...). Defaults to the first stage.
        plot: Optional PNG to draw the loss curve and the suggestions on.

    Returns:
        An `LRFindResult` with `valley`, `minimum` and `steep` suggestions.
    """
    from transferkit.commands.learning_rates import run_lr_find

    return run_lr_find(resolve_recipe(recipe, "finetune", settings), stage, plot, start_lr, end_lr, num_steps,
                       verbose=verbose)


def plot_schedule(plot: str | Path, recipe: str | Path | Recipe | None = None, *, command: str = "finetune",
                  verbose: bool = True, **settings: Any):
    """Draw the learning rate (and momentum) a `pretrain` or `finetune` run would use, step by step, to PNG `plot`.

    The stages come from the run's own Plan, so the drawing is what the run does.
    Returns the `ScheduleCurve`.
    """
    from transferkit.commands.learning_rates import plot_schedule as draw
    from transferkit.commands.learning_rates import schedule_curve

    resolved = resolve_recipe(recipe, command, settings)
    curve = schedule_curve(resolved, command)
    draw(curve, plot, title=f"{command}: {resolved.schedule} schedule, {len(curve.lrs)} steps")
    if verbose:
        print(f"schedule: {len(curve.lrs)} steps in {len(curve.stage_starts)} stage(s), learning rate "
              f"{curve.lrs.min():.3g} to {curve.lrs.max():.3g}; plot written to {plot}", flush=True)
    return curve


def inspect(model_dir: str | Path | None = None, *, base: str | Path | None = None, cut: str | None = None,
            backbone: str | None = None, verbose: bool = True):
    """The freeze audit of a classifier artifact, or the layers and blocks of a model file or a backbone.

    Exactly one of `model_dir`, `base` (a Keras model file, with an optional `cut`) or `backbone`.

    Raises:
        SettingsError: none or several of them, or `cut` without `base`.
    """
    from transferkit.errors import SettingsError

    if (model_dir is not None) + (base is not None) + (backbone is not None) != 1:
        raise SettingsError("inspect takes exactly one of MODEL_DIR (an artifact), --base FILE (a model file) or "
                            "--backbone NAME.")
    if cut is not None and base is None:
        raise SettingsError(f"--cut {cut!r} goes with --base FILE; expected no --cut with MODEL_DIR or --backbone.")
    if backbone is not None:
        from transferkit.finetuning.hub import inspect_backbone

        return inspect_backbone(backbone)
    if base is not None:
        from transferkit.finetuning.bases import inspect_base

        return inspect_base(str(base), cut)
    from transferkit.commands.inspect import inspect as audit_artifact

    return audit_artifact(model_dir, verbose=verbose)


def diagnose(model: Any, data: Any = None, batches: int = 4, **options: Any):
    """Per-layer activation and gradient health of `model` (a Keras model, an artifact folder or a `.keras`
    file) on a few batches, with verdicts; see `transferkit.commands.diagnose.diagnose`."""
    from transferkit.commands.diagnose import diagnose as run

    return run(model, data, batches, **options)
