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
    from transferkit.pretraining.train import run_pretrain

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
    from transferkit.finetuning.train import run_finetune

    with quiet(not verbose):
        return run_finetune(resolve_recipe(recipe, "finetune", settings), verbose=verbose)


def export(model_dir: str | Path, out: str | Path | None = None, *, mc_samples: int = 30,
           verbose: bool = True) -> Result:
    """Export an artifact as a SavedModel (default `model_dir/serving`) and check it.

    Models with dropout also get a `serve_mc` endpoint of `mc_samples` MC dropout samples.
    """
    from transferkit.commands.export import run_export

    return run_export(model_dir, out, mc_samples=mc_samples, verbose=verbose)


def evaluate(model_dir: str | Path, data: str | None = None, *, mc_samples: int = 0, top_k: int | None = None,
             plots: str | Path | None = None, output: str | Path | None = None, tta: int = 1,
             verbose: bool = True) -> Result:
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
                            tta=tta, verbose=verbose)


def predict(model_dir: str | Path, inputs: list[str] | str, *, mc_samples: int = 0,
            output: str | Path | None = None, tta: int = 1, verbose: bool = True) -> list[dict[str, Any]]:
    """Predicted class and probability (and MC dropout uncertainty) for image files or a data spec.

    `tta` > 1 adds `tta_class` and `tta_probability`: the mean over each input and `tta - 1` augmented copies.
    """
    from transferkit.commands.predict import run_predict

    with quiet(not verbose):
        return run_predict(model_dir, [inputs] if isinstance(inputs, str) else list(inputs),
                           mc_samples=mc_samples, output=output, tta=tta, verbose=verbose)
