"""Thin runners for exported endpoints: a numpy batch in, a dict of numpy outputs out, in each format's own runtime.

`open_endpoint(folder, endpoint)` opens `serve` or `serve_mc` of an export
folder written by `transferkit export`: a SavedModel (TensorFlow), `serve.onnx`
/ `serve_mc.onnx` (ONNX Runtime) or `serve.tflite` / `serve_mc.tflite` (the
LiteRT interpreter). Every runner takes float32 inputs of the exact example
shape with any batch size and refuses anything else with an error of its
runtime:

- SavedModel: `InvalidArgumentError` from the signature's shape check.
- ONNX Runtime: `InvalidArgument` ("Invalid rank for input", "Got invalid
  dimensions for input") from the session, which also answers an empty batch.
- LiteRT: the interpreter's own `Interpreter.signature_runner` resizes its input
  to whatever it is given and checks nothing but the element type. The runner
  resizes strictly (`resize_tensor_input(strict=True)`: only the `-1` batch
  dimension may change), so LiteRT refuses another rank or size with a
  `ValueError`. LiteRT's kernels cannot run an empty batch: the runner answers
  one itself, with outputs of batch size 0 (the LiteRT runtime is not called).

Example:

>>> from transferkit.commands.runners import open_endpoint
>>> serve = open_endpoint("saved_models/digits-classifier/serving-onnx", "serve")   # doctest: +SKIP
>>> serve(np.zeros((2, 8, 8, 1), "float32"))["probabilities"].shape               # doctest: +SKIP
(2, 10)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT = "inputs"


class SavedModelRunner:
    """An endpoint (signature) of a SavedModel, run by TensorFlow."""

    runtime = "TensorFlow"

    @staticmethod
    def version() -> str:
        import tensorflow

        return tensorflow.__version__

    def __init__(self, folder: str | Path, endpoint: str = "serve"):
        import tensorflow as tf

        self._tf = tf
        self._signature = tf.saved_model.load(str(folder)).signatures[endpoint]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in self._signature(inputs=self._tf.constant(x)).items()}


class OnnxRunner:
    """An ONNX file, run by ONNX Runtime on the CPU (its checks of rank, sizes and type are the session's)."""

    runtime = "ONNX Runtime"

    @staticmethod
    def version() -> str:
        import onnxruntime

        return onnxruntime.__version__

    def __init__(self, path: str | Path, threads: int | None = None):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self._names = [output.name for output in self._session.get_outputs()]

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        return dict(zip(self._names, self._session.run(self._names, {INPUT: x})))


class LiteRTRunner:
    """A one-signature `.tflite` file, run by the LiteRT interpreter, with a strict input shape and empty batches."""

    runtime = "LiteRT"

    @staticmethod
    def version() -> str:
        import ai_edge_litert

        return ai_edge_litert.__version__

    def __init__(self, path: str | Path, threads: int | None = None):
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_path=str(path), num_threads=threads)
        (signature,) = self._interpreter.get_signature_list()
        runner = self._interpreter.get_signature_runner(signature)  # only for the names: a live one blocks resizing
        self._input = runner.get_input_details()[INPUT]
        self._outputs = runner.get_output_details()

    def __call__(self, x: np.ndarray) -> dict[str, np.ndarray]:
        if not isinstance(x, np.ndarray) or x.dtype != self._input["dtype"]:
            raise ValueError(f"LiteRT: expected {np.dtype(self._input['dtype']).name} inputs of shape "
                             f"{_shape(self._input)}. Received: {getattr(x, 'dtype', type(x).__name__)}")
        try:  # strict: only the -1 (batch) dimension may change
            self._interpreter.resize_tensor_input(self._input["index"], list(x.shape), strict=True)
        except (ValueError, RuntimeError) as err:
            raise ValueError(f"LiteRT: expected inputs of shape {_shape(self._input)}. Received: shape="
                             f"{list(x.shape)} ({str(err).strip().splitlines()[0]})") from None
        if x.shape[0] == 0:
            return {name: np.zeros((0, *d["shape_signature"][1:]), d["dtype"]) for name, d in self._outputs.items()}
        self._interpreter.allocate_tensors()
        self._interpreter.set_tensor(self._input["index"], x)
        self._interpreter.invoke()
        return {name: self._interpreter.get_tensor(d["index"]) for name, d in self._outputs.items()}


def _shape(details: dict) -> list:
    return [None if d == -1 else int(d) for d in details["shape_signature"]]


def open_endpoint(folder: str | Path, endpoint: str = "serve", threads: int | None = None):
    """The runner of `endpoint` in an export folder, by what the folder holds.

    Args:
        folder: String or Path. A SavedModel folder, or a folder holding `ENDPOINT.onnx` or `ENDPOINT.tflite`.
        endpoint: String. `serve` or `serve_mc`. Defaults to `"serve"`.
        threads: Integer or `None`. ONNX Runtime's intra-op threads or LiteRT's threads. Defaults to
            `None` (each runtime's default: all cores for ONNX Runtime, one thread for LiteRT).

    Returns:
        A callable from a float32 numpy batch to a dict of numpy outputs.

    Raises:
        FileNotFoundError: the folder holds no such endpoint.
    """
    folder = Path(folder)
    if (folder / "saved_model.pb").is_file():
        return SavedModelRunner(folder, endpoint)
    if (folder / f"{endpoint}.onnx").is_file():
        return OnnxRunner(folder / f"{endpoint}.onnx", threads)
    if (folder / f"{endpoint}.tflite").is_file():
        return LiteRTRunner(folder / f"{endpoint}.tflite", threads)
    raise FileNotFoundError(f"{str(folder)!r} holds no SavedModel, {endpoint}.onnx or {endpoint}.tflite.")
