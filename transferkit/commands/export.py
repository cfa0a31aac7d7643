"""Export a transferkit artifact as a SavedModel (and ONNX, LiteRT), and check it against the Keras model.

The `serve` endpoint (also `serving_default`) takes raw float32 inputs named
`inputs` with a free batch size (preprocessing is inside the model) and returns
`probabilities` for a classifier or `features` for an encoder. It is
deterministic: dropout off (`MCDropout` included) and BatchNorm on its moving
statistics. A classifier with dropout also gets `serve_mc`, the stochastic
one. On JAX the model is converted with jax2tf (Keras's `ExportArchive`), and
the SavedModel also holds it unchecked as `serve_unchecked` (`serve_mc_unchecked`). Both refuse an input of another shape with an error (before it reaches a
kernel: PITFALLS 16) and answer an empty batch with empty outputs. ONNX and
LiteRT exports (`transferkit.commands.export_formats`) are written beside the SavedModel;
their `serve_mc` is a fixed ensemble of dropout masks (`transferkit.commands.mc_ensemble`).

Example:

>>> import tensorflow as tf
>>> from transferkit.commands.export import run_export
>>> run_export("saved_models/digits-classifier")               # doctest: +SKIP
>>> serve = tf.saved_model.load("saved_models/digits-classifier/serving").signatures["serve"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.store.manifest import Manifest
from transferkit.training import runs
from transferkit.errors import SettingsError, TransferkitError
from transferkit.commands.export_checks import CHECK_BATCH_SIZES, compare
from transferkit.commands.export_formats import (artifact_data, check_quantize, convertible_saved_model, folder_names,
                                        parse_formats, quantizable, require_packages, write_format)
from transferkit.pieces.uncertainty import deterministic_model, has_dropout, mc_predict, monte_carlo_model, summarize_samples
from transferkit.pieces.uncertainty import mc_samples as mc_samples_of

MC_CHECK_SAMPLES = 1200  # per example, on each side of the MC check
MC_ATOL = 0.1
MC_SEED = 0  # of the fixed ensemble of dropout masks in ONNX's and LiteRT's serve_mc


def run_export(model_dir: str | Path, out: str | Path | None = None, mc_samples: int = 30,
               formats: str | Sequence[str] = "savedmodel", quantize: str | None = None,
               verbose: bool = True) -> runs.Result:
    """Write `model_dir`'s model in each of `formats`, reload each in its own runtime and check it.

    `serve` runs the model with dropout off and BatchNorm in inference mode. A
    classifier with dropout also gets `serve_mc`: `mc_samples` MC dropout
    samples per example, returning `mean`, `std` and `entropy`; random in the
    SavedModel, a fixed ensemble of `mc_samples` dropout masks (seed `MC_SEED`)
    in ONNX and LiteRT (`transferkit.commands.mc_ensemble`). Every folder is published
    only when every format has passed its check.

    Example:

    >>> run_export("saved_models/digits-classifier", formats="savedmodel,onnx,litert")   # doctest: +SKIP

    Args:
        model_dir: String or Path. A transferkit artifact folder.
        out: String, Path or `None`. The SavedModel folder; ONNX goes to `OUT-onnx` and
            LiteRT to `OUT-litert` (`OUT-litert-QUANTIZE` when quantized). Defaults
            to `model_dir/serving`.
        mc_samples: Integer >= 2. MC dropout samples per example in `serve_mc`.
            Defaults to `30`.
        formats: String or sequence of strings. A comma list of `savedmodel`, `onnx` and
            `litert`. Defaults to `"savedmodel"`.
        quantize: String or `None`. LiteRT's quantization: `dynamic`, `float16` or `int8`
            (calibrated on the artifact's training split); its check is argmax agreement
            and accuracy on the test split. Defaults to `None` (float32).
        verbose: Bool. Print one line per format on success. Defaults to `True`.

    Returns:
        A `Result` whose `artifact` is the SavedModel folder (else the first one written) and
        whose metrics hold `max_relative_difference` (the SavedModel check's worst difference
        over the output's scale) and `KEY_...` figures of the other formats. Each format's
        record is also written to the manifest's `exports`.

    Raises:
        SettingsError: `model_dir` is not an artifact, an unknown format or quantization,
            `quantize` without litert or for an encoder, ONNX or LiteRT on another backend
            than TensorFlow, or `mc_samples` < 2.
        TransferkitError: an export does not match the Keras model (nothing is written then).
    """
    model_dir = Path(model_dir)
    formats = parse_formats(formats)
    manifest = artifacts.read_manifest(model_dir)
    check_quantize(quantize, formats, manifest.kind)
    require_packages(formats)
    if keras.backend.backend() != "tensorflow" and set(formats) - {"savedmodel"}:
        raise SettingsError(f"--format {','.join(formats)} needs the TensorFlow backend (its converters read "
                            f"TensorFlow graphs); run with --backend tensorflow. Received: backend="
                            f"{keras.backend.backend()!r}")
    model = artifacts.load_model(model_dir)
    out = Path(out) if out else model_dir / "serving"
    folders = folder_names(out, formats, quantize)
    output_name = "probabilities" if manifest.kind == "classifier" else "features"
    served = deterministic_model(model)
    mc = manifest.kind == "classifier" and has_dropout(model)
    if mc and mc_samples < 2:
        raise SettingsError(f"--mc-samples must be at least 2. Received: mc_samples={mc_samples}")
    data = artifact_data(model_dir, manifest) if quantize else None
    records: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        tmp = {key: stack.enter_context(artifacts.atomic_dir(path)) for key, path in folders.items()}
        if "savedmodel" in tmp:
            records["savedmodel"] = write_saved_model(tmp["savedmodel"], served, model, manifest, output_name,
                                                      mc_samples if mc else None)
        converted = [key for key in tmp if key != "savedmodel"]
        if converted:
            records.update(_write_converted(converted, tmp, served, model, manifest, output_name,
                                            mc_samples if mc else None, quantize, data))
    exports = {**manifest.exports, **{key: {"path": str(folders[key]), **records[key]} for key in records}}
    manifest = artifacts.write_manifest(model_dir, dataclasses.replace(manifest, exports=exports))
    for key, record in records.items():
        runs.print_line(describe(record, folders[key]), verbose)
    return runs.Result(model=model, history={}, metrics=_metrics(records), artifact=next(iter(folders.values())),
                       manifest=manifest.to_json())


def write_saved_model(folder: Path, served: keras.Model, model: keras.Model, manifest: Manifest,
                      output_name: str, mc_samples: int | None) -> dict[str, Any]:
    """The SavedModel with `serve` (and the random `serve_mc`) in `folder`, checked; returns its record."""
    import tensorflow as tf

    input_shape = tuple(manifest.input_shape)
    spec = tf.TensorSpec((None, *input_shape), tf.float32, name="inputs")
    dtype = served.outputs[0].dtype
    outputs = tuple(served.outputs[0].shape[1:])
    mc_model = None if mc_samples is None else monte_carlo_model(model)
    # every model is tracked before the first endpoint: on JAX an endpoint takes the variables tracked when it is
    # added as its inputs' shapes, but those tracked when it is traced (at `write_out`) as its inputs (#18)
    archive = keras.export.ExportArchive()
    for tracked in (served, mc_model):
        if tracked is not None:
            archive.track(tracked)
    add_checked_endpoint(archive, "serve", lambda x: {output_name: served(x, training=False)}, spec,
                         {output_name: (outputs, dtype)})
    if mc_model is not None:

        def serve_mc(x):
            mean, std, entropy, _ = summarize_samples(mc_samples_of(mc_model, x, mc_samples))
            return {"mean": mean, "std": std, "entropy": entropy}

        empty = {"mean": (outputs, dtype), "std": (outputs, dtype), "entropy": ((), dtype)}
        add_checked_endpoint(archive, "serve_mc", serve_mc, spec, empty)
    archive.write_out(str(folder), verbose=False)
    record = {"format": "savedmodel", "runtime": f"TensorFlow {tf.__version__}", "endpoints": {
        "serve": {"max_relative_difference": check_export(folder, served, manifest, output_name)}}}
    if mc_model is not None:
        record["endpoints"]["serve_mc"] = {"mean_difference": check_mc_export(folder, mc_model, manifest, mc_samples)}
        record["mc"] = {"form": "random", "samples": mc_samples}
    return record


def _write_converted(keys: list[str], tmp: dict[str, Path], served: keras.Model, model: keras.Model,
                     manifest: Manifest, output_name: str, mc_samples: int | None, quantize: str | None,
                     data) -> dict[str, dict[str, Any]]:
    """ONNX and LiteRT, from one SavedModel written for the converters."""
    from transferkit.commands.mc_ensemble import ensemble_endpoint, fixed_mask_model, masks_of

    references: dict[str, Callable] = {"serve": lambda x: {output_name: served(x, training=False)}}
    convertible = quantizable(model)  # the same function, in a form int8 quantizes well; checked against `model`
    ensemble, mc = None, None
    if mc_samples is not None:
        reference = fixed_mask_model(model, mc_samples, MC_SEED)
        references["serve_mc"] = ensemble_endpoint(reference, mc_samples)
        ensemble = fixed_mask_model(convertible, mc_samples, MC_SEED)  # the same masks: the same seeds, in order
        mc = {"samples": mc_samples, "seed": MC_SEED, "masks": masks_of(reference)}
    with convertible_saved_model(deterministic_model(convertible), ensemble, tuple(manifest.input_shape),
                                 output_name, mc_samples or 0) as source:
        return {key: write_format(key, tmp[key], source, references, manifest, quantize, data, mc) for key in keys}


def describe(record: dict[str, Any], folder: Path) -> str:
    """One line on what an export holds and how it was checked."""
    kind = {"savedmodel": "SavedModel", "onnx": "ONNX", "litert": "LiteRT"}[record["format"]]
    if record.get("quantize"):
        kind += f" ({record['quantize']} quantization)"
    endpoints = " and ".join(f"'{e}'" for e in record["endpoints"])
    serve = record["endpoints"]["serve"]
    if "agreement" in serve:
        check = (f"its class agrees with the Keras model's on {serve['agreement']:.1%} of {serve['examples']} test "
                 f"examples; test accuracy {serve['accuracy']:.4f} (Keras {serve['keras_accuracy']:.4f}, "
                 f"drop {serve['accuracy_drop']:+.4f})")
    else:
        check = (f"{record['runtime'].rsplit(' ', 1)[0]} matches the Keras model (max difference "
                 f"{serve['max_relative_difference']:.2g} of the output's scale at batch sizes "
                 f"{', '.join(map(str, CHECK_BATCH_SIZES))})")
    line = f"export: {kind} with {endpoints} written to {folder}; {check}"
    if record.get("mc", {}).get("form") == "fixed ensemble":
        mc = record["mc"]
        line += f"; 'serve_mc' is a fixed ensemble of {mc['samples']} dropout masks (seed {mc['seed']})"
    return line


def _metrics(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    metrics = {}
    for key, record in records.items():
        prefix = "" if key == "savedmodel" else f"{key.replace('-', '_')}_"
        for name, value in record["endpoints"]["serve"].items():
            if isinstance(value, float) and name != "keras_accuracy":
                metrics[prefix + name] = value
    return metrics


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


def check_export(path: Path, model: keras.Model, manifest: Manifest, output_name: str) -> float:
    """Reload the SavedModel and compare `serve` with `model` at several batch sizes.

    Args:
        path: Path. The SavedModel folder.
        model: The Keras model `serve` should match: called with `training=False`,
            so it must be deterministic (see `deterministic_model`).
        manifest: Manifest. The artifact's manifest (input shape and value range).
        output_name: String. The output of `serve` to compare.

    Returns:
        The largest absolute difference divided by the output's scale (its
        largest absolute value over the checked inputs).

    Raises:
        TransferkitError: that ratio exceeds `RTOL`, or an output is not finite.
    """
    from transferkit.commands.runners import SavedModelRunner

    serve = SavedModelRunner(path, "serve")
    return compare(lambda x: {output_name: serve(x)[output_name]}, lambda x: {output_name: model(x, training=False)},
                   manifest, "'serve'")


def check_mc_export(path: Path, mc_model: keras.Model, manifest: Manifest, samples: int) -> float:
    """`serve_mc`'s mean over many calls is close to the Keras MC mean (both are estimates)."""
    import tensorflow as tf

    serve_mc = tf.saved_model.load(str(path)).signatures["serve_mc"]
    lo, hi = manifest.value_range
    x = np.random.default_rng(1).uniform(lo, hi, size=(4, *manifest.input_shape)).astype("float32")
    calls = max(1, MC_CHECK_SAMPLES // samples)
    served = np.mean([serve_mc(inputs=tf.constant(x))["mean"].numpy() for _ in range(calls)], axis=0)
    expected = mc_predict(None, x, samples=calls * samples, mc_model=mc_model).mean
    difference = float(np.max(np.abs(served - expected)))
    if not difference <= MC_ATOL:
        raise TransferkitError(f"The exported 'serve_mc' mean differs from the Keras MC mean by {difference:.3g} "
                               f"(expected at most {MC_ATOL}); nothing was written.")
    return difference
