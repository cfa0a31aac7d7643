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
from transferkit.data import Split, load_data, pipeline
from transferkit.errors import SettingsError


def run_evaluate(model_dir: str | Path, data: str | None = None, batch_size: int = 256,
                 verbose: bool = True) -> runs.Result:
    """Accuracy and loss on the artifact's test split, or on every example of `data`.

    Given `data` that is the artifact's own training data (same fingerprint), only
    its test split is used, so no training example is counted.
    """
    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir, ("classifier",))
    spec = data or manifest["data"]["spec"]
    loaded = load_data(spec, image_size=manifest.get("image_size"))
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
    model = keras.saving.load_model(model_dir / artifacts.MODEL)
    loss, accuracy = model.evaluate(pipeline(x, y, batch_size), verbose=0)
    metrics = {"accuracy": float(accuracy), "loss": float(loss), "examples": len(x)}
    runs.print_line(f"evaluate: accuracy {accuracy:.4f}, loss {loss:.4f} on {len(x)} examples ({where} of {spec})",
                    verbose)
    return runs.Result(model=model, history={}, metrics=metrics, artifact=model_dir, manifest=manifest)

