"""ONNX and LiteRT exports, each reloaded in its own runtime and checked against the Keras model.

Both are converted from one SavedModel written for the converters (never
published): `serve` is the deterministic model (dropout off, BatchNorm on its
moving statistics) behind a shape check, and `serve_mc` the fixed ensemble of
MC dropout masks of `transferkit.commands.mc_ensemble` (random ops do not convert:
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

Each file is reloaded in its runtime (`transferkit.commands.runners`) and checked against
the Keras model (`transferkit.commands.export_checks`).

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

from transferkit.commands import export_checks as checks
from transferkit.errors import SettingsError, TransferkitError
from transferkit.store.manifest import Manifest

FORMATS = ("savedmodel", "onnx", "litert")
QUANTIZE = ("dynamic", "float16", "int8")
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

    from transferkit.pieces.freezing import all_layers

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

    from transferkit.commands.mc_ensemble import ensemble_endpoint

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


def write_format(key: str, folder: Path, source: Path, references: dict[str, Callable], manifest: Manifest,
                 quantize: str | None = None, data: tuple[np.ndarray, ...] | None = None,
                 mc: dict[str, Any] | None = None) -> dict[str, Any]:
    """Convert each endpoint of `source` into `folder`, reload it in its runtime and check it against Keras.

    Args:
        key: String. `onnx`, or `litert` with its quantization (`litert-int8`).
        folder: Path. The (temporary) folder to write into.
        source: Path. The SavedModel of `convertible_saved_model`.
        references: Dict. For each endpoint, the Keras function it must match.
        manifest: Manifest. The artifact's manifest.
        quantize: String or `None`. LiteRT's quantization. Defaults to `None`.
        data: Tuple `(x_train, x_test, y_test)` of the artifact's split, for a quantized export. Defaults to `None`.
        mc: Dict or `None`. `samples`, `seed` and `masks` of `serve_mc`'s fixed ensemble. Defaults to `None`.

    Returns:
        The record written to `folder/export.json`.

    Raises:
        TransferkitError: a conversion or a check fails.
    """
    from transferkit.commands.runners import LiteRTRunner, OnnxRunner

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
            check = checks.check_quantized(run, reference, x_test[:limit], y_test[:limit], output, what)
        else:
            check = {"max_relative_difference": checks.compare(run, reference, manifest, what)}
        if endpoint == "serve_mc":
            check["min_std" if not quantize else "max_std"] = checks.spread(run, manifest, what, every=not quantize)
        checks.check_signature(run, reference, manifest, what)
        record["endpoints"][endpoint] = {"file": path.name, "bytes": path.stat().st_size, **check}
    record["runtime"] = f"{runner_kind.runtime} {runner_kind.version()}"
    if mc is not None:
        record["mc"] = {"form": "fixed ensemble", "samples": mc["samples"], "seed": mc["seed"],
                        "masks": "mc_masks.npz"}
    write_record(folder, record, mc and mc["masks"])
    return record


def artifact_data(model_dir: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`(x_train, x_test, y_test)` of the artifact's split, `x_train` its first `REPRESENTATIVE_EXAMPLES`.

    Raises:
        TransferkitError: the data is no longer the data the artifact was trained on.
    """
    from transferkit.training import runs

    loaded, split = runs.artifact_data(model_dir, manifest, verbose=False)
    if split is None:
        raise TransferkitError(f"The data {manifest.data.spec!r} has changed since {str(model_dir)!r} was "
                               "trained; a quantized export is checked on its test split.")
    train = np.asarray(loaded.x[split.train[:REPRESENTATIVE_EXAMPLES]], "float32")
    return train, np.asarray(loaded.x[split.test], "float32"), np.asarray(loaded.y[split.test])


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
