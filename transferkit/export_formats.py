"""ONNX and LiteRT exports, each reloaded in its own runtime and checked against the Keras model.

Both are converted from one SavedModel written for the converters (never
published): `serve` is the deterministic model (dropout off, BatchNorm on its
moving statistics) behind a shape check, and `serve_mc` the fixed ensemble of
MC dropout masks of `transferkit.mc_ensemble` (random ops do not convert:
PITFALLS 15). Each endpoint is its own file, `ENDPOINT.onnx` or
`ENDPOINT.tflite`, with `mc_masks.npz` (the masks) and `export.json` (what was
checked) beside it.

- ONNX: tf2onnx 1.17 from the SavedModel's signature (its `from_function`
  path, which Keras's `model.export(format="onnx")` takes, turns the constants
  a Keras `Normalization` captures into extra graph inputs); Keras's own
  numpy-2 patch of tf2onnx is applied first. Run by ONNX Runtime.
- LiteRT: `tf.lite.TFLiteConverter` with LiteRT's builtin ops only (Keras's
  `model.export(format="litert")` also allows TensorFlow "Flex" ops, which the
  LiteRT interpreter cannot run), optionally quantized: `dynamic` (int8
  weights), `float16` (float16 weights) or `int8` (weights and activations,
  calibrated on up to 200 examples of the artifact's training split; inputs and
  outputs stay float32). Run by the `ai_edge_litert` interpreter.

Float exports must match Keras within `RTOL` of each output's scale at batch
sizes 1, 7 and 32; quantized ones must agree with Keras's class (argmax) on at
least `MIN_AGREEMENT` of the test split, and their accuracy there and its drop
from Keras's are reported and recorded.

This module imports TensorFlow only inside functions: the CLI reads its choices.
"""

from __future__ import annotations

import contextlib
import json
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.errors import SettingsError, TransferkitError

FORMATS = ("savedmodel", "onnx", "litert")
QUANTIZE = ("dynamic", "float16", "int8")
CHECK_BATCH_SIZES = (1, 7, 32)
# float32 round-off through a deep network grows with the output's scale: a MobileNetV2's probabilities differ
# by ~1e-5 between Keras and its SavedModel (PITFALLS 17). 1e-4 of the scale is ~800 float32 ulps; a wrong
# export (dropout or batch statistics left on, other preprocessing) differs by 1e-2 of it or more.
RTOL = 1e-4
MIN_AGREEMENT = 0.9  # of a quantized export's classes with Keras's, on the test split
REPRESENTATIVE_EXAMPLES = 200  # int8 calibration
QUANTIZED_MC_EXAMPLES = 64  # serve_mc's quantized check runs samples x this many rows


def parse_formats(value: str | Sequence[str]) -> tuple[str, ...]:
    """`"savedmodel,onnx"` (or a list) -> `("savedmodel", "onnx")`, each once, checked against `FORMATS`."""
    names = [n.strip() for n in (value.split(",") if isinstance(value, str) else value)]
    for name in names:
        if name not in FORMATS:
            raise SettingsError(f"Unknown export format {name!r}; expected a comma list of {', '.join(FORMATS)}. "
                                f"Received: format={value!r}")
    return tuple(dict.fromkeys(names))


_NEEDS = {"onnx": ("tf2onnx", "onnx", "onnxruntime"), "litert": ("ai_edge_litert",)}


def require_packages(formats: Sequence[str]) -> None:
    """Refuse, before any work, a format whose converter or runtime is not installed (its extra says what)."""
    import importlib.util

    for name in formats:
        missing = [m for m in _NEEDS.get(name, ()) if importlib.util.find_spec(m) is None]
        if missing:
            raise SettingsError(f"--format {name} needs {', '.join(missing)}: pip install 'transferkit[{name}]'.")


def check_quantize(quantize: str | None, formats: Sequence[str], kind: str) -> None:
    """Refuse a `quantize` that is unknown, without litert, or for an encoder (its check is accuracy)."""
    if quantize is None:
        return
    if quantize not in QUANTIZE:
        raise SettingsError(f"Unknown quantization {quantize!r}; expected one of {', '.join(QUANTIZE)}. "
                            f"Received: quantize={quantize!r}")
    if "litert" not in formats:
        raise SettingsError(f"--quantize {quantize} applies to the litert format; add it to --format "
                            f"(Received: format={','.join(formats)}).")
    if kind != "classifier":
        raise SettingsError(f"--quantize needs a classifier (its check is the accuracy); this artifact is an {kind}.")


def folder_names(out: Path, formats: Sequence[str], quantize: str | None) -> dict[str, Path]:
    """Each format's folder by its key: the SavedModel at `out`; `onnx`, `litert[-QUANTIZE]` beside it as `OUT-KEY`."""
    keys = {"savedmodel": "savedmodel", "onnx": "onnx", "litert": "litert" + (f"-{quantize}" if quantize else "")}
    return {keys[f]: out if f == "savedmodel" else out.with_name(f"{out.name}-{keys[f]}") for f in formats}


_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


def _selu_for_int8(x):
    from keras import ops

    return _SELU_SCALE * (ops.relu(x) + _SELU_ALPHA * (ops.exp(ops.minimum(x, 0.0)) - 1.0))


def quantizable(model):
    """`model`, or a clone sharing its weights whose SELU `Activation` layers compute SELU in a form int8 keeps.

    LiteRT's converter turns TensorFlow's SELU into `select(x > 0, x, alpha * (exp(x) - 1))`, whose
    `exp` int8 quantizes over its whole range (e^5 ~ 148): the negative branch, `exp(x)` in (0, 1), is
    left two or three levels, and the demo's classifier lost 7.5 points of accuracy. `scale * (relu(x)
    + alpha * (exp(min(x, 0)) - 1))` is the same function, and its `exp` stays in (0, 1]. (SELU inside
    a `Dense` or convolution, not as its own layer, keeps TensorFlow's form.)
    """
    import keras

    from transferkit.freezing import all_layers

    def is_selu(layer) -> bool:
        return isinstance(layer, keras.layers.Activation) and layer.activation is keras.activations.selu

    if not any(is_selu(layer) for layer in all_layers(model)):
        return model
    def clone(layer):
        return keras.layers.Activation(_selu_for_int8, name=layer.name) if is_selu(layer) else layer

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


@contextlib.contextmanager
def convertible_saved_model(served, ensemble, input_shape: tuple[int, ...], output_name: str,
                            samples: int) -> Iterator[Path]:
    """A temporary SavedModel for the converters: `serve` (and `serve_mc`, the fixed ensemble) behind a shape check."""
    import keras
    import tensorflow as tf

    from transferkit.mc_ensemble import ensemble_endpoint

    spec = tf.TensorSpec((None, *input_shape), tf.float32, name="inputs")
    archive = keras.export.ExportArchive()
    archive.track(served)
    archive.add_endpoint("serve", lambda x: {output_name: served(tf.ensure_shape(x, spec.shape), training=False)},
                         [spec])
    if ensemble is not None:
        archive.track(ensemble)
        mc = ensemble_endpoint(ensemble, samples)
        archive.add_endpoint("serve_mc", lambda x: mc(tf.ensure_shape(x, spec.shape)), [spec])
    with tempfile.TemporaryDirectory(prefix="transferkit-convert-") as folder:
        archive.write_out(folder, verbose=False)
        yield Path(folder)


def to_onnx(saved_model: Path, endpoint: str, path: Path) -> str:
    """Convert `endpoint` of `saved_model` to the ONNX file `path` with tf2onnx; returns the converter's name."""
    import tf2onnx  # noqa: F401  (before the patch, which reads it)
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    with warnings.catch_warnings(), _quiet("tf2onnx"):
        warnings.simplefilter("ignore")
        patch_tf2onnx()  # numpy 2 compatibility, as in Keras's own ONNX export
        graph_def, inputs, outputs, renames = tf2onnx.tf_loader.from_saved_model(
            str(saved_model), None, None, tag=["serve"], signatures=[endpoint], return_tensors_to_rename=True)
        proto, _ = tf2onnx.convert.from_graph_def(graph_def, name=endpoint, input_names=inputs,
                                                  output_names=outputs, tensors_to_rename=renames,
                                                  output_path=str(path))
    opset = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return f"tf2onnx {tf2onnx.__version__}, opset {opset}"


def to_litert(saved_model: Path, endpoint: str, path: Path, quantize: str | None,
              representative: np.ndarray | None) -> str:
    """Convert `endpoint` of `saved_model` to the LiteRT file `path` (builtin ops only); returns the converter."""
    import tensorflow as tf

    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model), signature_keys=[endpoint])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]  # no Flex: LiteRT cannot run it
    if quantize:
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if quantize == "float16":
        converter.target_spec.supported_types = [tf.float16]
    if quantize == "int8":
        converter.representative_dataset = lambda: ([x[None]] for x in representative)
    path.write_bytes(converter.convert())
    return f"TFLiteConverter (TensorFlow {tf.__version__})" + (f", {quantize} quantization" if quantize else "")


def write_format(key: str, folder: Path, source: Path, references: dict[str, Callable], manifest: dict[str, Any],
                 quantize: str | None = None, data: tuple[np.ndarray, ...] | None = None,
                 mc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert each endpoint of `source` into `folder`, reload it in its runtime and check it against Keras.

    Args:
        key: String. `onnx`, or `litert` with its quantization (`litert-int8`).
        folder: Path. The (temporary) folder to write into.
        source: Path. The SavedModel of `convertible_saved_model`.
        references: Dict. For each endpoint, the Keras function it must match.
        manifest: Dict. The artifact's manifest.
        quantize: String or `None`. LiteRT's quantization. Defaults to `None`.
        data: Tuple `(x_train, x_test, y_test)` of the artifact's split, for a quantized export. Defaults to `None`.
        mc: Dict or `None`. `samples`, `seed` and `masks` of `serve_mc`'s fixed ensemble. Defaults to `None`.

    Returns:
        The record written to `folder/export.json`.

    Raises:
        TransferkitError: a conversion or a check fails.
    """
    from transferkit.runners import LiteRTRunner, OnnxRunner

    fmt = key.split("-")[0]
    runner_kind, suffix = (OnnxRunner, "onnx") if fmt == "onnx" else (LiteRTRunner, "tflite")
    record: dict[str, Any] = {"format": fmt, "quantize": quantize, "endpoints": {}}
    for endpoint, reference in references.items():
        path = folder / f"{endpoint}.{suffix}"
        what = f"{'ONNX' if fmt == 'onnx' else 'LiteRT'}{' ' + quantize if quantize else ''} {endpoint!r}"
        try:
            with _quiet("absl"):
                record["converter"] = (to_onnx(source, endpoint, path) if fmt == "onnx" else
                                       to_litert(source, endpoint, path, quantize, data and data[0]))
            run = runner_kind(path)
        except Exception as err:  # the converters' and runtimes' own error types
            raise TransferkitError(f"Converting {what} failed ({type(err).__name__}: "
                                   f"{(str(err).strip().splitlines() or [''])[0]}); nothing was written.") from None
        if quantize:
            x_test, y_test = data[1], data[2]
            limit = QUANTIZED_MC_EXAMPLES if endpoint == "serve_mc" else len(x_test)
            output = "mean" if endpoint == "serve_mc" else "probabilities"  # quantized: classifiers only
            check = check_quantized(run, reference, x_test[:limit], y_test[:limit], output, what)
        else:
            check = {"max_relative_difference": compare(run, reference, manifest, what)}
        if endpoint == "serve_mc":
            check["min_std" if not quantize else "max_std"] = _spread(run, manifest, what, every=not quantize)
        check_signature(run, reference, manifest, what)
        record["endpoints"][endpoint] = {"file": path.name, "bytes": path.stat().st_size, **check}
    record["runtime"] = f"{runner_kind.runtime} {runner_kind.version()}"
    if mc is not None:
        record["mc"] = {"form": "fixed ensemble", "samples": mc["samples"], "seed": mc["seed"],
                        "masks": "mc_masks.npz"}
    write_record(folder, record, mc and mc["masks"])
    return record


def check_signature(run: Callable, reference: Callable, manifest: dict[str, Any], what: str) -> None:
    """An empty batch gives each output with batch size 0; an unbatched input is refused with an error.

    Raises:
        TransferkitError: either does not hold.
    """
    shape = tuple(manifest["input_shape"])
    expected = {name: (0, *np.shape(value)[1:]) for name, value in reference(np.zeros((1, *shape), "float32")).items()}
    got = {name: tuple(value.shape) for name, value in _run(run, np.zeros((0, *shape), "float32"), what).items()}
    if got != expected:
        raise TransferkitError(f"The exported {what} answers an empty batch with shapes {got} (expected {expected}); "
                               "nothing was written.")
    try:
        run(np.zeros(shape, "float32"))
    except Exception:  # the runtime's own error type
        return
    raise TransferkitError(f"The exported {what} accepts an unbatched input of shape {shape}; nothing was written.")


def _spread(run: Callable, manifest: dict[str, Any], what: str, every: bool) -> float:
    """`serve_mc`'s largest std across classes, over 7 random inputs: the smallest (`every`) or the largest.

    It must be > 0: for every input in a float format; for some input in a quantized one, whose
    probabilities move in steps (int8: 1/256), so that a confident input can give S equal samples.
    """
    lo, hi = manifest["value_range"]
    x = np.random.default_rng(2).uniform(lo, hi, size=(7, *manifest["input_shape"])).astype("float32")
    spreads = np.max(_run(run, x, what)["std"], axis=1)
    spread = float(np.min(spreads) if every else np.max(spreads))
    if not spread > 0:
        raise TransferkitError(f"The exported {what} gives std 0 for {'an input' if every else 'every input'}: its "
                               "dropout masks change nothing; nothing was written.")
    return spread


def artifact_data(model_dir: Path, manifest: dict[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x_train, x_test, y_test)` of the artifact's split, `x_train` its first `REPRESENTATIVE_EXAMPLES`.

    Raises:
        TransferkitError: the data is no longer the data the artifact was trained on.
    """
    from transferkit import artifacts, runs
    from transferkit.data import Split

    loaded = runs.load_like_artifact(manifest["data"]["spec"], manifest, verbose=False)
    if loaded.fingerprint != manifest["data"]["fingerprint"]:
        raise TransferkitError(f"The data {manifest['data']['spec']!r} has changed since {str(model_dir)!r} was "
                               "trained; a quantized export is checked on its test split.")
    split = Split.from_dict(artifacts.read_json(model_dir, artifacts.SPLIT))
    train = np.asarray(loaded.x[split.train[:REPRESENTATIVE_EXAMPLES]], "float32")
    return train, np.asarray(loaded.x[split.test], "float32"), np.asarray(loaded.y[split.test])


def compare(run: Callable, reference: Callable, manifest: dict[str, Any], what: str) -> float:
    """The largest difference between `run` and `reference` on random inputs, over each output's scale.

    Inputs are uniform in the manifest's value range, at each of `CHECK_BATCH_SIZES`.

    Args:
        run: Function from a float32 batch to a dict of numpy outputs (the export, in its runtime).
        reference: Function from a float32 batch to a dict of outputs (Keras).
        manifest: Dict. The artifact's manifest (input shape and value range).
        what: String. The export, for the error message, e.g. `"ONNX 'serve'"`.

    Returns:
        The largest absolute difference divided by its output's scale (its largest absolute value).

    Raises:
        TransferkitError: that ratio exceeds `RTOL`, an output is not finite, or the runtime fails.
    """
    rng = np.random.default_rng(0)
    lo, hi = manifest["value_range"]
    differences: dict[tuple[str, int], float] = {}
    scales: dict[str, float] = {}
    for batch in CHECK_BATCH_SIZES:
        x = rng.uniform(lo, hi, size=(batch, *manifest["input_shape"])).astype("float32")
        expected = {k: np.asarray(v, "float64") for k, v in reference(x).items()}
        got = _run(run, x, what)
        for name, value in expected.items():
            differences[name, batch] = float(np.max(np.abs(np.asarray(got[name], "float64") - value)))
            scales[name] = max(scales.get(name, 0.0), float(np.max(np.abs(value))))
    tiny = float(np.finfo("float32").tiny)
    ratios = {key: d / max(scales[key[0]], tiny) for key, d in differences.items()}
    (name, batch), worst = max(ratios.items(), key=lambda item: (not np.isfinite(item[1]), item[1]))
    if not worst <= RTOL:
        raise TransferkitError(
            f"The exported {what} differs from the Keras model by {differences[name, batch]:.3g} in {name!r} at batch "
            f"size {batch}, {worst:.3g} of the output's scale {scales[name]:.3g} (expected at most {RTOL}); "
            "nothing was written.")
    return worst


def check_quantized(run: Callable, reference: Callable, x: np.ndarray, y: np.ndarray, output: str,
                    what: str) -> dict[str, float]:
    """Argmax agreement with Keras and accuracy of a quantized export on `x` (the test split).

    The examples go through in batches of 1, 7 and 32 in turn.

    Returns:
        `agreement`, `accuracy`, `keras_accuracy`, `accuracy_drop` (Keras's minus the export's) and `examples`.

    Raises:
        TransferkitError: agreement below `MIN_AGREEMENT`, non-finite outputs, or the runtime fails.
    """
    got, expected, start = [], [], 0
    while start < len(x):
        batch = x[start:start + CHECK_BATCH_SIZES[len(got) % len(CHECK_BATCH_SIZES)]]
        got.append(np.asarray(_run(run, batch, what)[output]))
        expected.append(np.asarray(reference(batch)[output]))
        start += len(batch)
    got, expected = np.concatenate(got), np.concatenate(expected)
    if not np.all(np.isfinite(got)):
        raise TransferkitError(f"The exported {what} gives non-finite outputs; nothing was written.")
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    figures = {"agreement": agreement, "accuracy": float(np.mean(got.argmax(1) == y)),
               "keras_accuracy": float(np.mean(expected.argmax(1) == y)), "examples": len(x)}
    figures["accuracy_drop"] = figures["keras_accuracy"] - figures["accuracy"]
    if agreement < MIN_AGREEMENT:
        raise TransferkitError(f"The exported {what} agrees with the Keras model's class on {agreement:.1%} of "
                               f"{len(x)} test examples (expected at least {MIN_AGREEMENT:.0%}); nothing was written.")
    return figures


def _run(run: Callable, x: np.ndarray, what: str) -> dict[str, np.ndarray]:
    try:
        return run(x)
    except Exception as err:  # the runtime's own error types
        raise TransferkitError(f"The exported {what} failed in its runtime ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                               "nothing was written.") from None


def write_record(folder: Path, record: dict[str, Any], masks: dict[str, np.ndarray] | None) -> None:
    """`export.json` (and `mc_masks.npz`) in an export folder."""
    if masks:
        np.savez(folder / "mc_masks.npz", **masks)
    (folder / "export.json").write_text(json.dumps(record, indent=2, sort_keys=True))


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        log.setLevel(level)
