"""Evaluate a saved classifier on its test split, or on other data: how well, and where it fails.

Besides accuracy, NLL and calibration error, the per-class precision, recall
and F1 (`transferkit.commands.report`), balanced and top-k accuracy, the confusion
matrix and its most-confused pairs; optionally as JSON and as pictures.

Example:

>>> from transferkit.commands.evaluate import run_evaluate
>>> result = run_evaluate("saved_models/digits-classifier", plots="eval")   # doctest: +SKIP
>>> result.report["predictions"]["deterministic"]["most_confused"][0]         # doctest: +SKIP
{'true': '8', 'predicted': '1', 'count': 4}
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from transferkit.store import artifacts
from transferkit.store.manifest import Manifest
from transferkit.training import runs
from transferkit.pieces.augmentation import tta_predict
from transferkit.data.sources import batches_of, pipeline, require_labels
from transferkit.errors import SettingsError
from transferkit.commands.report import class_report, confusion_figure, format_report, resolve_top_k, top_losses_figure
from transferkit.pieces.uncertainty import calibration, deterministic_model, has_dropout, mc_predict


@dataclasses.dataclass(repr=False)
class Evaluation(runs.Result):
    """An evaluation's `Result`, with the whole report as JSON-ready data (what `--output` writes)."""

    report: dict[str, Any] = dataclasses.field(default_factory=dict)


def run_evaluate(model_dir: str | Path, data: str | None = None, mc_samples: int = 0, batch_size: int = 256,
                 top_k: int | None = None, plots: str | Path | None = None, output: str | Path | None = None,
                 tta: int = 1, verbose: bool = True, skip_bad_files: bool = False) -> Evaluation:
    """Accuracy, loss, calibration and where the model fails, on the artifact's test split or every example of `data`.

    Given `data` that is the artifact's own training data (same fingerprint), only
    its test split is used, so no training example is counted. With `mc_samples`,
    the same figures for MC dropout predictions, side by side; with `tta` > 1, for
    test-time augmentation (`transferkit.pieces.augmentation.tta_predict`).

    Args:
        model_dir: Path of a classifier artifact.
        data: Optional data spec. Defaults to the artifact's own data (its test split).
        mc_samples: Integer. MC dropout samples per example (0: none). Defaults to `0`.
        batch_size: Integer. Examples per prediction batch. Defaults to `256`.
        top_k: Optional integer. Report the top-k accuracy. Defaults to 5 with more than 5 classes, else none.
        plots: Optional folder for `confusion.png` (and `top_losses.png` for images). Defaults to `None`.
        output: Optional JSON file for the whole report. Defaults to `None`.
        tta: Integer >= 1. Predictions averaged per example over the input and `tta - 1` augmented
            copies, reported beside the plain ones. Defaults to `1` (off).
        verbose: Bool. Print the report. Defaults to `True`.
        skip_bad_files: Bool. Skip `dir:` files that cannot be decoded, counted and listed, instead of stopping
            (always, if the artifact's training skipped some). Defaults to `False`.

    Returns:
        An `Evaluation`: `metrics` holds the headline figures, `report` everything.

    Raises:
        SettingsError: Not a classifier artifact, data that does not fit it, a bad
            `top_k`, `mc_samples` on a model without dropout, `tta` below 1 or on a model that does not
            take images, or an unwritable `plots`/`output`.
    """
    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir, ("classifier",))
    check_tta(tta, manifest)
    num_classes = manifest.num_classes
    top_k = resolve_top_k(top_k, num_classes)
    plots, output = _check_destinations(plots, output)
    spec = data or manifest.data.spec
    loaded, split = runs.artifact_data(model_dir, manifest, spec, verbose, skip_bad_files)
    require_labels(loaded)
    if split is not None:
        where, x, y = "test split", loaded.x[split.test], loaded.y[split.test]
    else:
        where, x, y = "all examples", loaded.x, loaded.y
    if int(y.max()) >= num_classes:
        raise SettingsError(f"The data has label {int(y.max())}; the model has {num_classes} classes.")
    model = artifacts.load_model(model_dir)
    if mc_samples and not has_dropout(model):
        raise SettingsError(f"--mc-samples needs a model with dropout; {str(model_dir)!r} has none "
                            "(fine-tune with --dropout).")
    names = class_names(manifest)
    probabilities = {"deterministic": deterministic_model(model).predict(pipeline(x, batch_size=batch_size), verbose=0)}
    if mc_samples:
        probabilities["mc_dropout"] = mc_predict(model, x, mc_samples).mean
    if tta > 1:
        probabilities["tta"] = tta_predict(model, batches_of(x, batch_size, desc="test-time augmentation"), tta)
    predictions = {kind: {**calibration(p, y), **class_report(p, y, names, top_k)} for kind, p in probabilities.items()}
    report = {"model": str(model_dir), "data": spec, "where": where, "examples": len(x), "class_names": names,
              "top_k": top_k, "mc_samples": mc_samples, "tta": tta, "predictions": predictions}
    metrics = {**_headline(predictions["deterministic"]), "loss": predictions["deterministic"]["nll"],
               "examples": len(x)}
    if mc_samples:
        metrics.update({f"mc_{k}": v for k, v in _headline(predictions["mc_dropout"]).items()})
    if tta > 1:
        metrics.update({f"tta_{k}": v for k, v in _headline(predictions["tta"]).items()})
    titles = {"deterministic": "deterministic", "mc_dropout": f"MC dropout ({mc_samples} samples)",
              "tta": f"TTA ({tta} copies)"}
    columns = {titles[kind]: _headline(p) for kind, p in predictions.items()}
    runs.print_line(f"evaluate: {len(x)} examples ({where} of {spec})\n" + format_columns(columns, top_k) + "\n"
                    + format_report(predictions["deterministic"]), verbose)
    if output:
        artifacts.write_json(output, report)
        runs.print_line(f"report written to {output}", verbose)
    if plots:
        written = _write_plots(plots, x, y, probabilities["deterministic"], names, loaded, report)
        runs.print_line(f"pictures written to {plots}: {', '.join(written)}", verbose)
    return Evaluation(model=model, history={}, metrics=metrics, artifact=model_dir, manifest=manifest.to_json(),
                      report=report)


def check_tta(tta: int, manifest: Manifest) -> None:
    """Refuse, before any work, a `tta` below 1, or above 1 for a model that does not take images."""
    if tta < 1:
        raise SettingsError(f"--tta must be at least 1 (1: the input alone, no augmentation). Received: tta={tta}")
    if tta > 1 and len(manifest.input_shape) != 3:
        raise SettingsError(f"--tta needs a model that takes images; the one here takes inputs of shape "
                            f"{tuple(manifest.input_shape)}. Received: tta={tta}")


def class_names(manifest: Manifest) -> list[str]:
    """The model's class names from its manifest, else the class numbers as text."""
    names = manifest.data.class_names
    if names and len(names) == manifest.num_classes:
        return [str(n) for n in names]
    return [str(i) for i in range(manifest.num_classes)]


def _headline(figures: dict[str, Any]) -> dict[str, float]:
    """The single-number figures of one kind of prediction, in the order they are printed."""
    headline = {k: figures[k] for k in ("accuracy", "balanced_accuracy", "nll", "ece")}
    headline.update(macro_f1=figures["macro_avg"]["f1"], weighted_f1=figures["weighted_avg"]["f1"])
    if figures["top_k_accuracy"] is not None:
        headline["top_k_accuracy"] = figures["top_k_accuracy"]
    return headline


def _check_destinations(plots: str | Path | None, output: str | Path | None) -> tuple[Path | None, Path | None]:
    """Refuse, before any work, a --plots that is a file or a --output that is a folder or has no folder."""
    plots = Path(plots) if plots else None
    output = Path(output) if output else None
    if plots is not None and plots.exists() and not plots.is_dir():
        raise SettingsError(f"--plots {str(plots)!r} is a file; expected a folder for the pictures.")
    if output is not None and (output.is_dir() or not output.absolute().parent.is_dir()):
        raise SettingsError(f"--output {str(output)!r} cannot be written: expected a file in an existing folder.")
    return plots, output


def _write_plots(folder: Path, x, y, probabilities, names: list[str], loaded, report: dict[str, Any]) -> list[str]:
    """confusion.png, and for image inputs top_losses.png, into `folder` (created if missing)."""
    from transferkit.store.pictures import write_pictures

    figures = {"confusion.png": confusion_figure(
        report["predictions"]["deterministic"]["confusion_matrix"], names,
        title=f"{report['examples']} examples ({report['where']} of {report['data']})")}
    if len(loaded.input_shape) == 3:
        figures["top_losses.png"] = top_losses_figure(x, y, probabilities, names, value_range=loaded.value_range)
    folder.mkdir(parents=True, exist_ok=True)
    return write_pictures(folder, figures)


def format_columns(columns: dict[str, dict[str, float]], top_k: int | None = None) -> str:
    """One row per metric (accuracy, balanced accuracy, nll, ece, F1s, top-k), one column per kind of prediction."""
    names = list(columns)
    widths = [max(len(n), 8) for n in names]
    lines = [f"{'metric':<18}" + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for metric in columns[names[0]]:
        label = f"top{top_k}_accuracy" if metric == "top_k_accuracy" else metric
        lines.append(f"{label:<18}" + "  ".join(f"{columns[n][metric]:.4f}".rjust(w) for n, w in zip(names, widths)))
    return "\n".join(lines)
