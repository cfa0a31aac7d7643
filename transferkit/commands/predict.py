"""Predict with a saved classifier: class, probability and, with MC dropout, uncertainty.

Example:

>>> from transferkit.commands.predict import run_predict
>>> rows = run_predict("saved_models/digits-classifier", ["npz:new.npz"], mc_samples=30)   # doctest: +SKIP
>>> rows[0]                                                                          # doctest: +SKIP
{'input': '0', 'class': '3', 'probability': 0.97, 'std': 0.02, 'entropy': 0.13, 'mutual_information': 0.04}
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import os
import sys
import textwrap
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.store.manifest import Manifest
from transferkit.training import runs
from transferkit.pieces.augmentation import tta_augmentation, tta_batch
from transferkit.data.sources import SCHEMES, batches_of
from transferkit.data.image_files import ImageFiles
from transferkit.data.images import check_images
from transferkit.errors import SettingsError
from transferkit.commands.evaluate import check_tta
from transferkit.pieces.uncertainty import deterministic_model, has_dropout, mc_predict, monte_carlo_model

OUTPUT_FORMATS = (".csv", ".json")


def run_predict(model_dir: str | Path, inputs: list[str], mc_samples: int = 0, output: str | Path | None = None,
                batch_size: int = 256, tta: int = 1, verbose: bool = True,
                skip_bad_files: bool = False) -> list[dict[str, Any]]:
    """One row per input: its name, the predicted class, its probability (and MC figures, and TTA's).

    With `tta` > 1 each row also has `tta_class` and `tta_probability`: from the
    mean probabilities over the input and `tta - 1` augmented copies (the
    model's own augmentation, else horizontal flips; dropout off).

    `inputs` are image files, or one data spec (`npz:PATH`, `dir:PATH`, ...). Rows
    are printed as CSV, or written to `output` (`.csv` or `.json`) through a
    temporary file renamed into place (and a line on stderr says so). A row's
    `input` is its file's path (in the folder, for `dir:PATH`), else its index. Inputs are read batch by batch (image
    files decoded as they go, a progress bar for long runs) and each batch's
    rows are written before the next is read. With `skip_bad_files`, files that
    cannot be decoded are left out and listed on stderr instead of stopping the run.
    """
    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir, ("classifier",))
    check_tta(tta, manifest)
    if output is not None and Path(output).suffix not in OUTPUT_FORMATS:
        raise SettingsError(f"--output must end in .csv or .json. Received: output={str(output)!r}")
    if output is not None and not Path(output).parent.is_dir():
        raise SettingsError(f"The folder of --output {str(output)!r} does not exist.")
    names, x = _load_inputs(inputs, manifest, skip_bad_files)
    model = artifacts.load_model(model_dir)
    classes = manifest.data.class_names or [str(i) for i in range(manifest.num_classes)]
    if mc_samples and not has_dropout(model):
        raise SettingsError(f"--mc-samples needs a model with dropout; {str(model_dir)!r} has none.")
    augmentation = tta_augmentation(model, tta) if tta > 1 else None
    served = deterministic_model(model)
    # deterministic: MC dropout off; MC: every dropout on (both share the model's weights)
    model = monte_carlo_model(model) if mc_samples else served
    rows: list[dict[str, Any]] = []
    with _row_writer(output, verbose) as write:
        for start, batch in zip(range(0, len(x), batch_size), batches_of(x, batch_size, desc="predicting")):
            averaged = None if augmentation is None else tta_batch(served, batch, tta, augmentation)
            for i, row in enumerate(_predict_rows(model, batch, mc_samples, classes)):
                row = {"input": names[start + i], **row}
                if averaged is not None:
                    best = int(averaged[i].argmax())
                    row.update(tta_class=classes[best], tta_probability=float(averaged[i, best]))
                rows.append(row)
                write(row)
    if output is not None and verbose:
        print(f"{len(rows)} predictions written to {output}", file=sys.stderr)
    return rows


def _predict_rows(model, batch: np.ndarray, mc_samples: int, classes: list[str]):
    """The rows of one batch of inputs, without their names; `model` is the MC model when `mc_samples`."""
    if mc_samples:
        mc = mc_predict(model, batch, mc_samples, mc_model=model)
        probabilities = mc.mean
    else:
        probabilities = keras.ops.convert_to_numpy(model.predict_on_batch(batch))
    best = probabilities.argmax(axis=1)
    for i in range(len(batch)):
        row = {"class": classes[best[i]], "probability": float(probabilities[i, best[i]])}
        if mc_samples:
            row.update(std=float(mc.std[i, best[i]]), entropy=float(mc.entropy[i]),
                       mutual_information=float(mc.mutual_information[i]))
        yield row


@contextlib.contextmanager
def _row_writer(output: str | Path | None, verbose: bool):
    """A `write(row)` that prints CSV rows (when verbose), or writes `output`'s temporary file, renamed at the end."""
    suffix = Path(output).suffix if output else ".csv"
    if output is None:
        stream = sys.stdout if verbose else io.StringIO()
        tmp = None
    else:
        tmp = Path(output).with_name(f".{Path(output).name}.tmp")
        stream = tmp.open("w")
    written = 0

    def write(row: dict[str, Any]) -> None:
        nonlocal written
        if suffix == ".json":  # json.dumps(rows, indent=2), a row at a time
            stream.write(("[\n" if not written else ",\n") + textwrap.indent(json.dumps(row, indent=2), "  "))
        else:
            writer = csv.DictWriter(stream, fieldnames=list(row), lineterminator="\n")
            if not written:
                writer.writeheader()
            writer.writerow(row)
        written += 1

    try:
        yield write
        if suffix == ".json":
            stream.write("\n]\n" if written else "[]\n")
        elif not written:
            stream.write("input\n")
        stream.flush()
    except BaseException:
        if tmp is not None:
            stream.close()
            tmp.unlink(missing_ok=True)
        raise
    if tmp is not None:
        stream.close()
        os.replace(tmp, output)


def row_names(x: Any) -> list[str]:
    """The name of each row of a data spec's inputs: a folder's files by their path in it, other rows by index."""
    if isinstance(x, ImageFiles):
        root = Path(x.root) if x.root else None
        return [Path(p).relative_to(root).as_posix() if root else str(p) for p in x.paths]
    return [str(i) for i in range(len(x))]


def _load_inputs(inputs: list[str], manifest: Manifest, skip_bad_files: bool = False) -> tuple[list[str], Any]:
    shape = tuple(manifest.input_shape)
    if len(inputs) == 1 and inputs[0].partition(":")[0] in SCHEMES:
        data = runs.load_like_artifact(inputs[0], manifest, skip_bad_files=skip_bad_files)
        names, x = row_names(data.x), data.x
    else:
        missing = [p for p in inputs if not Path(p).is_file()]
        if missing and Path(missing[0]).is_dir():
            raise SettingsError(f"Input {missing[0]!r} is a folder; pass it as the data spec dir:{missing[0]} "
                                "(its images, in class folders or not).")
        if missing:
            raise SettingsError(f"Input {missing[0]!r} is neither an image file nor a data spec "
                                "(npz:PATH, dir:PATH, tfds:NAME, digits).")
        if len(shape) != 3:
            raise SettingsError(f"The model takes inputs of shape {shape}, not images.")
        # a file that cannot be read fails here, named; or, skipping bad files, is left out (and listed)
        checked = check_images([Path(p) for p in inputs], shape[:2], channels=shape[2], skip_bad_files=skip_bad_files)
        if skip_bad_files and checked.bad:
            print(f"skipped {len(checked.bad)} file(s) that cannot be read: "
                  + ", ".join(path for path, _ in checked.bad), file=sys.stderr)
        if not len(checked.kept):
            raise SettingsError("No input can be read: every file given is broken.")
        names = [inputs[i] for i in checked.kept]
        x = ImageFiles([Path(n) for n in names], shape[:2], shape[2], plain=checked.plain)
    if tuple(x.shape[1:]) != shape:
        raise SettingsError(f"The inputs have shape {tuple(x.shape[1:])}; the model takes {shape}.")
    return names, x
