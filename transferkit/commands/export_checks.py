"""The checks of an export against the Keras model, in the export's own runtime.

Float exports must match Keras within `RTOL` of each output's scale at batch
sizes 1, 7 and 32 (`compare`); quantized ones must agree with Keras's class
(argmax) on at least `MIN_AGREEMENT` of the test split, and report their
accuracy there and its drop from Keras's (`check_quantized`). Every endpoint
must answer an empty batch with empty outputs and refuse an unbatched input
(`check_signature`), and a `serve_mc` must spread (`spread`). Each raises
`TransferkitError` ending "nothing was written": the export is then discarded.

This module imports neither TensorFlow nor Keras: the runners and references are callables.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from transferkit.errors import TransferkitError
from transferkit.store.manifest import Manifest

CHECK_BATCH_SIZES = (1, 7, 32)
# float32 round-off through a deep network grows with the output's scale: a MobileNetV2's probabilities differ
# by ~1e-5 between Keras and its SavedModel (PITFALLS 17). 1e-4 of the scale is ~800 float32 ulps; a wrong
# export (dropout or batch statistics left on, other preprocessing) differs by 1e-2 of it or more.
RTOL = 1e-4
MIN_AGREEMENT = 0.9  # of a quantized export's classes with Keras's, on the test split


def compare(run: Callable, reference: Callable, manifest: Manifest, what: str) -> float:
    """The largest difference between `run` and `reference` on random inputs, over each output's scale.

    Inputs are uniform in the manifest's value range, at each of `CHECK_BATCH_SIZES`.

    Args:
        run: Function from a float32 batch to a dict of numpy outputs (the export, in its runtime).
        reference: Function from a float32 batch to a dict of outputs (Keras).
        manifest: Manifest. The artifact's manifest (input shape and value range).
        what: String. The export, for the error message, e.g. `"ONNX 'serve'"`.

    Returns:
        The largest absolute difference divided by its output's scale (its largest absolute value).

    Raises:
        TransferkitError: that ratio exceeds `RTOL`, an output is not finite, or the runtime fails.
    """
    rng = np.random.default_rng(0)
    lo, hi = manifest.value_range
    differences: dict[tuple[str, int], float] = {}
    scales: dict[str, float] = {}
    for batch in CHECK_BATCH_SIZES:
        x = rng.uniform(lo, hi, size=(batch, *manifest.input_shape)).astype("float32")
        expected = {k: np.asarray(v, "float64") for k, v in reference(x).items()}
        got = run_guarded(run, x, what)
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
        got.append(np.asarray(run_guarded(run, batch, what)[output]))
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


def run_guarded(run: Callable, x: np.ndarray, what: str) -> dict[str, np.ndarray]:
    try:
        return run(x)
    except Exception as err:  # the runtime's own error types
        raise TransferkitError(f"The exported {what} failed in its runtime ({type(err).__name__}: "
                               f"{str(err).strip().splitlines()[0] if str(err).strip() else ''}); "
                               "nothing was written.") from None


def check_signature(run: Callable, reference: Callable, manifest: Manifest, what: str) -> None:
    """An empty batch gives each output with batch size 0; an unbatched input is refused with an error.

    Raises:
        TransferkitError: either does not hold.
    """
    shape = tuple(manifest.input_shape)
    expected = {name: (0, *np.shape(value)[1:]) for name, value in reference(np.zeros((1, *shape), "float32")).items()}
    got = {name: tuple(value.shape) for name, value in run_guarded(run, np.zeros((0, *shape), "float32"), what).items()}
    if got != expected:
        raise TransferkitError(f"The exported {what} answers an empty batch with shapes {got} (expected {expected}); "
                               "nothing was written.")
    try:
        run(np.zeros(shape, "float32"))
    except Exception:  # the runtime's own error type
        return
    raise TransferkitError(f"The exported {what} accepts an unbatched input of shape {shape}; nothing was written.")


def spread(run: Callable, manifest: Manifest, what: str, every: bool) -> float:
    """`serve_mc`'s largest std across classes, over 7 random inputs: the smallest (`every`) or the largest.

    It must be > 0: for every input in a float format; for some input in a quantized one, whose
    probabilities move in steps (int8: 1/256), so that a confident input can give S equal samples.
    """
    lo, hi = manifest.value_range
    x = np.random.default_rng(2).uniform(lo, hi, size=(7, *manifest.input_shape)).astype("float32")
    spreads = np.max(run_guarded(run, x, what)["std"], axis=1)
    spread = float(np.min(spreads) if every else np.max(spreads))
    if not spread > 0:
        raise TransferkitError(f"The exported {what} gives std 0 for {'an input' if every else 'every input'}: its "
                               "dropout masks change nothing; nothing was written.")
    return spread
