"""Export a transferkit artifact as a SavedModel, and check it against the Keras model.

The `serve` endpoint (also `serving_default`) takes raw float32 inputs named
`inputs` with a free batch size (preprocessing is inside the model) and returns
`probabilities` for a classifier or `features` for an encoder. It is
deterministic: dropout off (`MCDropout` included) and BatchNorm on its moving
statistics. A classifier with dropout also gets `serve_mc`, the stochastic
one. On JAX the model is converted with jax2tf (Keras's `ExportArchive`), and
the SavedModel also holds it unchecked as `serve_unchecked` (`serve_mc_unchecked`). Both refuse an input of another shape with an error (before it reaches a
kernel: PITFALLS 16) and answer an empty batch with empty outputs.

Example:

>>> import tensorflow as tf
>>> from transferkit.commands.export import run_export
>>> run_export("saved_models/digits-classifier")               # doctest: +SKIP
>>> serve = tf.saved_model.load("saved_models/digits-classifier/serving").signatures["serve"]  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.training import runs
from transferkit.errors import SettingsError, TransferkitError
from transferkit.pieces.uncertainty import deterministic_model, has_dropout, mc_predict, monte_carlo_model, summarize_samples
from transferkit.pieces.uncertainty import mc_samples as mc_samples_of

CHECK_BATCH_SIZES = (1, 7, 32)
# float32 round-off through a deep network grows with the output's scale: a MobileNetV2's probabilities differ
# by ~1e-5 between Keras and its SavedModel (PITFALLS 17). 1e-4 of the scale is ~800 float32 ulps; a wrong
# export (dropout or batch statistics left on, other preprocessing) differs by 1e-2 of it or more.
RTOL = 1e-4
MC_CHECK_SAMPLES = 1200  # per example, on each side of the MC check
MC_ATOL = 0.1


def run_export(model_dir: str | Path, out: str | Path | None = None, mc_samples: int = 30,
               verbose: bool = True) -> runs.Result:
    """Write `model_dir`'s model as a SavedModel (default `model_dir/serving`), then check it.

    `serve` runs the model with dropout off and BatchNorm in inference mode. A
    classifier with dropout also gets `serve_mc`: `mc_samples` MC dropout
    samples per example, returning `mean`, `std` and `entropy`.

    Args:
        model_dir: String or Path. A transferkit artifact folder.
        out: String, Path or `None`. Where to write the SavedModel. Defaults
            to `model_dir/serving`.
        mc_samples: Integer >= 2. MC dropout samples per example in `serve_mc`.
            Defaults to `30`.
        verbose: Bool. Print one line on success. Defaults to `True`.

    Returns:
        A `Result` whose `artifact` is the SavedModel folder and whose metrics
        hold `max_relative_difference`, the check's worst difference over the
        output's scale.

    Raises:
        SettingsError: `model_dir` is not an artifact, or `mc_samples` < 2.
        TransferkitError: the SavedModel does not match the Keras model
            (nothing is written then).
    """
    import tensorflow as tf

    model_dir = Path(model_dir)
    manifest = artifacts.read_manifest(model_dir)
    model = artifacts.load_model(model_dir)
    out = Path(out) if out else model_dir / "serving"
    output_name = "probabilities" if manifest["kind"] == "classifier" else "features"
    input_shape = tuple(manifest["input_shape"])
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name="inputs")
    served = deterministic_model(model)
    dtype = served.outputs[0].dtype
    outputs = tuple(served.outputs[0].shape[1:])

    archive = keras.export.ExportArchive()
    archive.track(served)
    add_checked_endpoint(archive, "serve", lambda x: {output_name: served(x, training=False)}, spec,
                         {output_name: (outputs, dtype)})
    mc_model = None
    if manifest["kind"] == "classifier" and has_dropout(model):
        if mc_samples < 2:
            raise SettingsError(f"--mc-samples must be at least 2. Received: mc_samples={mc_samples}")
        mc_model = monte_carlo_model(model)
        archive.track(mc_model)

        def serve_mc(x):
            mean, std, entropy, _ = summarize_samples(mc_samples_of(mc_model, x, mc_samples))
            return {"mean": mean, "std": std, "entropy": entropy}

        empty = {"mean": (outputs, dtype), "std": (outputs, dtype), "entropy": ((), dtype)}
        add_checked_endpoint(archive, "serve_mc", serve_mc, spec, empty)
    with artifacts.atomic_dir(out) as tmp:
        archive.write_out(str(tmp), verbose=False)
        worst = check_export(tmp, served, manifest, output_name)
        if mc_model is not None:
            check_mc_export(tmp, mc_model, manifest, mc_samples)
    endpoints = "'serve' and 'serve_mc'" if mc_model is not None else "'serve'"
    runs.print_line(f"export: SavedModel with {endpoints} written to {out}; 'serve' matches the Keras model "
                    f"(max difference {worst:.2g} of the output's scale at batch sizes "
                    f"{', '.join(map(str, CHECK_BATCH_SIZES))})", verbose)
    return runs.Result(model=model, history={}, metrics={"max_relative_difference": worst}, artifact=out,
                       manifest=manifest)


def add_checked_endpoint(archive, name: str, fn: Callable, spec, empty: dict[str, tuple]) -> None:
    """Add endpoint `name`: `fn` behind `checked_endpoint`'s checks, which are TensorFlow ops.

    On JAX, `fn` is converted by jax2tf first, as its own endpoint `NAME_unchecked`
    (same inputs and outputs, without the checks), and the checks wrap that.
    """
    input_shape = tuple(spec.shape[1:])
    if keras.backend.backend() != "jax":
        archive.add_endpoint(name, checked_endpoint(fn, input_shape, empty), [spec])
        return
    import tensorflow as tf

    converted = archive.add_endpoint(f"{name}_unchecked", fn, [spec])
    checked = tf.function(checked_endpoint(converted, input_shape, empty), input_signature=[spec], autograph=False)
    checked.get_concrete_function()  # traced: ExportArchive takes a traced tf.function as it is
    archive.add_endpoint(name, checked)


def checked_endpoint(fn: Callable, input_shape: tuple[int, ...], empty: dict[str, tuple]) -> Callable:
    """`fn` behind a check of its input's shape, answering an empty batch without calling it (TensorFlow).

    Args:
        fn: Function from a `(batch, *input_shape)` tensor to a dict of tensors.
        input_shape: Tuple of ints. The shape of one example.
        empty: Dict. For each output name, `(shape of one example, dtype)`.

    Returns:
        A function of `inputs` for `ExportArchive.add_endpoint`. An input of
        another shape fails with `InvalidArgumentError` ("Shape of tensor
        inputs [...] is not compatible with expected shape [...]") before any
        kernel sees it; an empty batch returns `(0, *shape)` outputs.
    """
    import tensorflow as tf

    def endpoint(inputs):
        inputs = tf.ensure_shape(inputs, (None, *input_shape), name="inputs_shape")
        return tf.cond(tf.shape(inputs)[0] > 0, lambda: fn(inputs),
                       lambda: {name: tf.zeros((0, *shape), dtype) for name, (shape, dtype) in empty.items()})

    return endpoint


def check_export(path: Path, model: keras.Model, manifest: dict, output_name: str) -> float:
    """Reload the SavedModel and compare `serve` with `model` at several batch sizes.

    Args:
        path: Path. The SavedModel folder.
        model: The Keras model `serve` should match: called with `training=False`,
            so it must be deterministic (see `deterministic_model`).
        manifest: Dict. The artifact's manifest (input shape and value range).
        output_name: String. The output of `serve` to compare.

    Returns:
        The largest absolute difference divided by the output's scale (its
        largest absolute value over the checked inputs).

    Raises:
        TransferkitError: that ratio exceeds `RTOL`, or an output is not finite.
    """
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures["serve"]
    rng = np.random.default_rng(0)
    lo, hi = manifest["value_range"]
    differences, scale = {}, 0.0
    for batch in CHECK_BATCH_SIZES:
        x = rng.uniform(lo, hi, size=(batch, *manifest["input_shape"])).astype("float32")
        expected = keras.ops.convert_to_numpy(model(x, training=False)).astype("float64")
        served = serve(inputs=tf.constant(x))[output_name].numpy().astype("float64")
        differences[batch] = float(np.max(np.abs(served - expected)))
        scale = max(scale, float(np.max(np.abs(expected))))
    batch = max(differences, key=lambda b: (not np.isfinite(differences[b]), differences[b]))
    worst = differences[batch] / max(scale, float(np.finfo("float32").tiny))
    if not worst <= RTOL:
        raise TransferkitError(
            f"The exported 'serve' differs from the Keras model by {differences[batch]:.3g} at batch size {batch}, "
            f"{worst:.3g} of the output's scale {scale:.3g} (expected at most {RTOL}); nothing was written."
        )
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
