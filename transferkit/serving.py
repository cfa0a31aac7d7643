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
from transferkit.errors import TransferkitError

CHECK_BATCH_SIZES = (1, 7, 32)
ATOL = 1e-5


def run_export(model_dir: str | Path, out: str | Path | None = None, verbose: bool = True) -> runs.Result:
    """Write `model_dir`'s model as a SavedModel (default `model_dir/serving`), then check it."""
    import tensorflow as tf

    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir)
    model = keras.saving.load_model(model_dir / artifacts.MODEL)
    out = Path(out) if out else model_dir / "serving"
    output_name = "probabilities" if manifest["kind"] == "classifier" else "features"
    spec = tf.TensorSpec((None, *manifest["input_shape"]), tf.float32, name="inputs")

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serve", lambda inputs: {output_name: model(inputs, training=False)}, [spec])
    with artifacts.atomic_dir(out) as tmp:
        archive.write_out(str(tmp), verbose=False)
        worst = check_export(tmp, model, manifest, output_name)
    runs.print_line(f"export: SavedModel written to {out}; 'serve' matches the Keras model "
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
