"""Predict with a saved classifier: class, probability and, with MC dropout, uncertainty.

Example:

>>> from transferkit.prediction import run_predict
>>> rows = run_predict("saved_models/digits-classifier", ["npz:new.npz"], mc_samples=30)   # doctest: +SKIP
>>> rows[0]                                                                          # doctest: +SKIP
{'input': '0', 'class': '3', 'probability': 0.97, 'std': 0.02, 'entropy': 0.13, 'mutual_information': 0.04}
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit import artifacts, runs
from transferkit.data import SCHEMES, read_images
from transferkit.errors import SettingsError
from transferkit.uncertainty import deterministic_model, has_dropout, mc_predict

OUTPUT_FORMATS = (".csv", ".json")


def run_predict(model_dir: str | Path, inputs: list[str], mc_samples: int = 0, output: str | Path | None = None,
                batch_size: int = 256, verbose: bool = True) -> list[dict[str, Any]]:
    """One row per input: its name, the predicted class, its probability (and MC figures).

    `inputs` are image files, or one data spec (`npz:PATH`, `dir:PATH`, ...). Rows
    are printed as CSV, or written to `output` (`.csv` or `.json`) through a
    temporary file renamed into place.
    """
    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir, ("classifier",))
    if output is not None and Path(output).suffix not in OUTPUT_FORMATS:
        raise SettingsError(f"--output must end in .csv or .json. Received: output={str(output)!r}")
    if output is not None and not Path(output).parent.is_dir():
        raise SettingsError(f"The folder of --output {str(output)!r} does not exist.")
    names, x = _load_inputs(inputs, manifest)
    model = artifacts.load_model(model_dir)
    classes = manifest["data"].get("class_names") or [str(i) for i in range(manifest["num_classes"])]
    if mc_samples:
        if not has_dropout(model):
            raise SettingsError(f"--mc-samples needs a model with dropout; {str(model_dir)!r} has none.")
        mc = mc_predict(model, x, mc_samples)
        probabilities = mc.mean
    else:
        probabilities = deterministic_model(model).predict(x, batch_size=batch_size, verbose=0)
    best = probabilities.argmax(axis=1)
    rows = []
    for i, name in enumerate(names):
        row = {"input": name, "class": classes[best[i]], "probability": float(probabilities[i, best[i]])}
        if mc_samples:
            row.update(std=float(mc.std[i, best[i]]), entropy=float(mc.entropy[i]),
                       mutual_information=float(mc.mutual_information[i]))
        rows.append(row)
    text = _format(rows, Path(output).suffix if output else ".csv")
    if output is None:
        if verbose:
            print(text, end="", flush=True)
    else:
        tmp = Path(output).with_name(f".{Path(output).name}.tmp")
        tmp.write_text(text)
        os.replace(tmp, output)
    return rows


def _load_inputs(inputs: list[str], manifest: dict) -> tuple[list[str], np.ndarray]:
    shape = tuple(manifest["input_shape"])
    if len(inputs) == 1 and inputs[0].partition(":")[0] in SCHEMES:
        data = runs.load_like_artifact(inputs[0], manifest)
        names, x = [str(i) for i in range(len(data.x))], data.x
    else:
        missing = [p for p in inputs if not Path(p).is_file()]
        if missing:
            raise SettingsError(f"Input {missing[0]!r} is neither an image file nor a data spec "
                                "(npz:PATH, dir:PATH, tfds:NAME, digits).")
        if len(shape) != 3:
            raise SettingsError(f"The model takes inputs of shape {shape}, not images.")
        names, x = list(inputs), read_images([Path(p) for p in inputs], shape[:2], channels=shape[2])
    if tuple(x.shape[1:]) != shape:
        raise SettingsError(f"The inputs have shape {tuple(x.shape[1:])}; the model takes {shape}.")
    return names, x


def _format(rows: list[dict[str, Any]], suffix: str) -> str:
    if suffix == ".json":
        return json.dumps(rows, indent=2) + "\n"
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["input"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()
