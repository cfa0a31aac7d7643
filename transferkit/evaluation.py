"""Evaluate a saved classifier on its test split, or on other data.

Example:

>>> from transferkit.evaluation import run_evaluate
>>> run_evaluate("saved_models/digits-classifier").metrics     # doctest: +SKIP
{'accuracy': 0.93, 'loss': 0.24, 'examples': 360}
"""

from __future__ import annotations

from pathlib import Path

import keras

from transferkit import artifacts, runs
from transferkit.data import Split, pipeline
from transferkit.errors import SettingsError
from transferkit.uncertainty import calibration, has_dropout, mc_predict


def run_evaluate(model_dir: str | Path, data: str | None = None, mc_samples: int = 0, batch_size: int = 256,
                 verbose: bool = True) -> runs.Result:
    """Accuracy, loss (NLL) and calibration error on the artifact's test split, or on every example of `data`.

    Given `data` that is the artifact's own training data (same fingerprint), only
    its test split is used, so no training example is counted. With `mc_samples`,
    the same figures for MC dropout predictions, side by side.
    """
    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir, ("classifier",))
    spec = data or manifest["data"]["spec"]
    loaded = runs.load_like_artifact(spec, manifest, verbose)
    runs.require_labels(loaded)
    if loaded.input_shape != tuple(manifest["input_shape"]):
        raise SettingsError(f"The data's inputs have shape {loaded.input_shape}; the model in {str(model_dir)!r} "
                            f"takes {tuple(manifest['input_shape'])}.")
    if loaded.fingerprint == manifest["data"]["fingerprint"]:
        where = "test split"
        index = Split.from_dict(artifacts.read_json(model_dir, artifacts.SPLIT)).test
        x, y = loaded.x[index], loaded.y[index]
    else:
        where, x, y = "all examples", loaded.x, loaded.y
    if int(y.max()) >= manifest["num_classes"]:
        raise SettingsError(f"The data has label {int(y.max())}; the model has {manifest['num_classes']} classes.")
    model = artifacts.load_model(model_dir)
    if mc_samples and not has_dropout(model):
        raise SettingsError(f"--mc-samples needs a model with dropout; {str(model_dir)!r} has none "
                            "(fine-tune with --dropout).")
    deterministic = calibration(model.predict(pipeline(x, batch_size=batch_size), verbose=0), y)
    metrics = {**deterministic, "loss": deterministic["nll"], "examples": len(x)}
    columns = {"deterministic": deterministic}
    if mc_samples:
        columns[f"MC dropout ({mc_samples} samples)"] = mc = calibration(mc_predict(model, x, mc_samples).mean, y)
        metrics.update({f"mc_{k}": v for k, v in mc.items()})
    runs.print_line(f"evaluate: {len(x)} examples ({where} of {spec})\n" + format_columns(columns), verbose)
    return runs.Result(model=model, history={}, metrics=metrics, artifact=model_dir, manifest=manifest)


def format_columns(columns: dict[str, dict[str, float]]) -> str:
    """accuracy / nll / ece rows, one column per kind of prediction."""
    names = list(columns)
    widths = [max(len(n), 8) for n in names]
    lines = ["metric    " + "  ".join(n.rjust(w) for n, w in zip(names, widths))]
    for metric in ("accuracy", "nll", "ece"):
        lines.append(f"{metric:<10}" + "  ".join(f"{columns[n][metric]:.4f}".rjust(w) for n, w in zip(names, widths)))
    return "\n".join(lines)
