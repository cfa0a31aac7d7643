"""Export a transferkit artifact as a SavedModel, and check it against the Keras model.

The `serve` endpoint (also `serving_default`) takes raw float32 inputs named
`inputs` with a free batch size (preprocessing is inside the model) and returns
`probabilities` for a classifier or `features` for an encoder.

Example:

>>> import tensorflow as tf
>>> from transferkit.serving import run_export
>>> run_export("saved_models/digits-classifier")               # doctest: +SKIP
>>> serve = tf.saved_model.load("saved_models/digits-classifier/serving").signatures["serve"]  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from transferkit import artifacts, runs
from transferkit.errors import SettingsError, TransferkitError
from transferkit.uncertainty import has_dropout, mc_predict, monte_carlo_model, summarize_samples
from transferkit.uncertainty import mc_samples as mc_samples_of

CHECK_BATCH_SIZES = (1, 7, 32)
ATOL = 1e-5
MC_CHECK_SAMPLES = 1200  # per example, on each side of the MC check
MC_ATOL = 0.1


def run_export(model_dir: str | Path, out: str | Path | None = None, mc_samples: int = 30,
               verbose: bool = True) -> runs.Result:
    """Write `model_dir`'s model as a SavedModel (default `model_dir/serving`), then check it.

    A classifier with dropout also gets `serve_mc`: `mc_samples` MC dropout
    samples per example, returning `mean`, `std` and `entropy`.
    """
    import tensorflow as tf

    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir)
    model = artifacts.load_model(model_dir)
    out = Path(out) if out else model_dir / "serving"
    output_name = "probabilities" if manifest["kind"] == "classifier" else "features"
    spec = tf.TensorSpec((None, *manifest["input_shape"]), tf.float32, name="inputs")

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda inputs: {output_name: model(inputs, training=False)}, [spec])
    mc_model = None
    if manifest["kind"] == "classifier" and has_dropout(model):
        if mc_samples < 2:
            raise SettingsError(f"--mc-samples must be at least 2. Received: mc_samples={mc_samples}")
        mc_model = monte_carlo_model(model)
        archive.track(mc_model)

        def serve_mc(inputs):
            mean, std, entropy, _ = summarize_samples(mc_samples_of(mc_model, inputs, mc_samples))
            return {"mean": mean, "std": std, "entropy": entropy}

        archive.add_endpoint("serve_mc", serve_mc, [spec])
    with artifacts.atomic_dir(out) as tmp:
        archive.write_out(str(tmp), verbose=False)
        worst = check_export(tmp, model, manifest, output_name)
        if mc_model is not None:
            check_mc_export(tmp, mc_model, manifest, mc_samples)
    endpoints = "'serve' and 'serve_mc'" if mc_model is not None else "'serve'"
    runs.print_line(f"export: SavedModel with {endpoints} written to {out}; 'serve' matches the Keras model "
                    f"(max abs difference {worst:.2g} at batch sizes {', '.join(map(str, CHECK_BATCH_SIZES))})",
                    verbose)
    return runs.Result(model=model, history={}, metrics={"max_abs_difference": worst}, artifact=out,
                       manifest=manifest)


def check_export(path: Path, model: keras.Model, manifest: dict, output_name: str) -> float:
    """Reload the SavedModel and compare `serve` with the Keras model at several batch sizes."""
    import tensorflow as tf

    reloaded = tf.saved_model.load(str(path))
    rng = np.random.default_rng(0)
    lo, hi = manifest["value_range"]
    worst = 0.0
    for batch in CHECK_BATCH_SIZES:
        x = rng.uniform(lo, hi, size=(batch, *manifest["input_shape"])).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x, training=False))
        served = reloaded.signatures["serve"](inputs=tf.constant(x))[output_name].numpy()
        difference = float(np.max(np.abs(served - expected)))
        if not np.isfinite(difference) or difference > ATOL:
            raise TransferkitError(
                f"The exported 'serve' differs from the Keras model by {difference:.3g} at batch size {batch} "
                f"(expected at most {ATOL}); nothing was written."
            )
        worst = max(worst, difference)
    return worst


def check_mc_export(path: Path, mc_model: keras.Model, manifest: dict, samples: int) -> float:
    """`serve_mc`'s mean over many calls is close to the Keras MC mean (both are estimates)."""
    import tensorflow as tf

    serve_mc = tf.saved_model.load(str(path)).signatures["serve_mc"]
    lo, hi = manifest["value_range"]
    x = np.random.default_rng(1).uniform(lo, hi, size=(4, *manifest["input_shape"])).astype("float32")
    calls = max(1, MC_CHECK_SAMPLES // samples)
    served = np.mean([serve_mc(inputs=tf.constant(x))["mean"].numpy() for _ in range(calls)], axis=0)
    expected = mc_predict(None, x, samples=calls * samples, mc_model=mc_model).mean
    difference = float(np.max(np.abs(served - expected)))
    if not difference <= MC_ATOL:
        raise TransferkitError(f"The exported 'serve_mc' mean differs from the Keras MC mean by {difference:.3g} "
                               f"(expected at most {MC_ATOL}); nothing was written.")
    return difference
