"""Health probes: per-layer activations and gradients of a Keras model on a few batches.

`diagnose(model, data)` runs a few batches forward and backward and reports,
for every layer with weights (Dense, Conv, ...): the mean and std of the
activation that follows it, the fraction of saturated outputs (sigmoid/tanh
near an asymptote), the fraction of dead units (ReLU outputs zero for every
example), the gradient norm, its ratio to the weight norm and to the top
layer's gradient norm. Then it gives verdicts (vanishing or exploding
gradients, saturation, dead units, broken self-normalization), each naming
the layers and the chapter's remedies in order with the flag that applies them
(`transferkit.pieces.health_report`).

The passes run on copies of the variables (`stateless_call`), so BatchNorm's
moving statistics and dropout's random state are left as they were; by
default BatchNorm and dropout run in training mode, as during `fit`.
`transferkit.diagnose` also takes an artifact folder, a `.keras` file and a data spec.

Example:

>>> import keras, numpy as np
>>> from transferkit.pieces.probes import diagnose
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
...                           keras.layers.Dense(3, activation="softmax")])
>>> x, y = np.random.randn(64, 8).astype("float32"), np.random.randint(0, 3, 64)
>>> report = diagnose(model, (x, y), batches=2)
>>> [row.name for row in report.layers]
['dense', 'dense_1']
>>> print(report.format())                                   # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from transferkit.errors import SettingsError
from transferkit.pieces.gradients import value_and_grads
from transferkit.pieces.health_report import (
    PERCENTILES, SATURATING, DiagnosisReport, LayerHealth, Thresholds, verdicts,
)
from transferkit.pieces.layer_outputs import ACTIVATION_LAYERS, activation_name, is_weighted, leaves, recording

# activations whose inactive units output exactly zero, so a unit can die
DYING = ("relu", "relu6")
_SAMPLES_PER_BATCH = 4096


def diagnose(
    model: keras.Model,
    data: Any,
    batches: int = 4,
    *,
    batch_size: int = 32,
    loss: str | Callable | None = "auto",
    training: bool = True,
    seed: int = 0,
    thresholds: Thresholds | None = None,
    labels: bool = True,
    source: str = "given data",
) -> DiagnosisReport:
    """Per-layer activation and gradient figures of a Keras `model` on a few batches, with verdicts.

    Example:

    >>> report = diagnose(model, (x, y))                               # doctest: +SKIP
    >>> report.healthy, [v.kind for v in report.verdicts]               # doctest: +SKIP
    (True, [])

    Args:
        model: A built Keras model.
        data: `(x, y)` arrays (`y` may be `None`), an array of inputs, or a batched
            `tf.data.Dataset` of `(x, y)` or `x`. Arrays are sampled with `seed`.
        batches: Int >= 1. Batches to run. Defaults to `4`.
        batch_size: Int >= 1. Examples per batch for arrays. Defaults to `32`.
        loss: `"auto"`, a Keras loss name or a callable `(y_true, y_pred)`.
            `"auto"` uses the model's compiled loss given labels, else sparse
            categorical cross-entropy for integer labels, MSE for targets shaped
            like the outputs, and without labels (or for an encoder) a fixed random
            projection of the outputs, which sends a unit-norm gradient down per example.
        training: Bool. Run BatchNorm and dropout in training mode. Defaults to `True`.
        seed: Int. Seed of the sample and of the random projection. Defaults to `0`.
        thresholds: Optional `Thresholds`. Defaults to `Thresholds()`.
        labels: Bool. Use the data's labels for the loss; `False` ignores them (an
            encoder's data carries class labels, not its targets). Defaults to `True`.
        source: String. What the data is, as the report states it. Defaults to `"given data"`.

    Returns:
        A `DiagnosisReport`.

    Raises:
        SettingsError: data that does not fit the model, `batches` or `batch_size` < 1.
    """
    check_count("batches", batches)
    check_count("batch_size", batch_size)
    prepared = prepare_batches(data, batches, batch_size, seed)
    if not labels:
        prepared = [(x, None) for x, _ in prepared]
    check_fits(model, prepared[0][0])
    return Probe(model).run(prepared, loss=loss, training=training, seed=seed,
                            thresholds=thresholds or Thresholds(), source=source)


def prepare_batches(data: Any, batches: int, batch_size: int = 32, seed: int = 0) -> list[tuple[np.ndarray, Any]]:
    """Up to `batches` fixed `(x, y)` numpy batches from arrays or a Dataset.

    Arrays (and streaming sources with `rows(indices)`, such as image files: only the
    sampled rows are decoded) are sampled without replacement with `seed`; a Dataset's first
    `batches` batches are taken as they come.

    Example:

    >>> [x.shape for x, _ in prepare_batches((np.zeros((70, 3)), None), batches=4, batch_size=32)]
    [(32, 3), (32, 3), (6, 3)]
    """
    import tensorflow as tf

    if isinstance(data, str):
        raise SettingsError(f"Expected arrays or a tf.data.Dataset; load a data spec first "
                            f"(transferkit.load_data). Received: data={data!r}")
    if isinstance(data, tf.data.Dataset):
        out = []
        for element in data.take(batches):
            x, y = (element[0], element[1] if len(element) > 1 else None) if isinstance(element, tuple) else (element, None)
            out.append((np.asarray(x), None if y is None else np.asarray(y)))
        if not out:
            raise SettingsError("The dataset holds no batches; expected a batched tf.data.Dataset of (x, y) or x.")
        return out
    if data is None:
        raise SettingsError("diagnose needs data: (x, y) arrays, a tf.data.Dataset or a data spec.")
    x, y = (data[0], data[1]) if isinstance(data, (tuple, list)) and len(data) == 2 else (data, None)
    lazy = hasattr(x, "rows")  # a streaming source (image files): only the sampled rows are decoded
    x = x if lazy else np.asarray(x)
    if x.ndim < 2 or len(x) == 0:
        raise SettingsError(f"Inputs must be a non-empty batch of examples. Received: x with shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise SettingsError(f"Inputs and labels disagree: {len(x)} inputs but {len(y)} labels.")
    order = np.random.default_rng(seed).permutation(len(x))[: batches * batch_size]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [((x.rows(c) if lazy else x[c]).astype("float32"), None if y is None else np.asarray(y)[c])
            for c in chunks]


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raise a `SettingsError` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")


def check_fits(model: keras.Model, x: np.ndarray) -> None:
    """Raise a `SettingsError` unless the batch `x` has the shape `model` takes."""
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if expected and (len(expected) != x.ndim - 1 or any(e not in (None, a) for e, a in zip(expected, x.shape[1:]))):
        raise SettingsError(f"The data's inputs have shape {tuple(x.shape[1:])}; the model takes {expected}.")


class Probe:
    """Runs batches through `model`, recording its layers' outputs and weight gradients.

    Built once per model (the callback reuses it at every check). Each batch is
    one forward and one backward pass on copies of the variables.

    Example:

    >>> probe = Probe(model)                                               # doctest: +SKIP
    >>> probe.run(prepare_batches((x, y), batches=2)).healthy               # doctest: +SKIP
    True
    """

    def __init__(self, model: keras.Model):
        if not model.built:
            raise SettingsError(f"Model {model.name!r} is not built; call it on data or give it a keras.Input.")
        self.model = model
        self.leaves = list(leaves(model))
        self._layers = dict(self.leaves)
        self.weighted = [(path, layer) for path, layer in self.leaves if is_weighted(layer)]
        self.watched = {id(layer): path for path, layer in self.leaves
                        if is_weighted(layer) or isinstance(layer, ACTIVATION_LAYERS)}
        self.has_batchnorm = any(isinstance(layer, keras.layers.BatchNormalization) for _, layer in self.leaves)
        self._loss: tuple[str, Callable] | None = None

    def run(self, batches: list[tuple[np.ndarray, Any]], loss: str | Callable | None = "auto",
            training: bool = True, seed: int = 0, thresholds: Thresholds = Thresholds(),
            source: str = "given data") -> DiagnosisReport:
        model = self.model
        variables = model.trainable_variables + model.non_trainable_variables
        count = len(model.trainable_variables)
        tallies: dict[str, _Tally] = {}
        order: list[str] = []
        grad_sums: dict[str, float] = {}
        examples = 0
        for index, (x, y) in enumerate(batches):
            values = [keras.ops.convert_to_tensor(v) for v in variables]
            x = keras.ops.convert_to_tensor(x)
            # "auto" may look at the predictions: a forward pass of its own, outside the gradient's
            self._resolve_loss(loss, y, lambda: model.stateless_call(values[:count], values[count:], x,
                                                                     training=training)[0], seed + index)
            fn = self._loss[1]
            position = {id(v): i for i, v in enumerate(variables)}
            per_layer = [[position[id(v)] for v in layer.weights] for _, layer in self.weighted]
            # integer weights (counters) have no gradient: they get None, as on a tape
            wanted = list(dict.fromkeys(i for ids in per_layer for i in ids if "float" in str(variables[i].dtype)))
            paths: list[str] = []

            def loss_of(weights, values=values, x=x, y=y):
                full = list(values)
                for i, weight in zip(wanted, weights):
                    full[i] = weight
                with recording(self.leaves, self.watched) as outputs:
                    predictions, _ = model.stateless_call(full[:count], full[count:], x, training=training)
                    value = keras.ops.mean(keras.ops.cast(fn(y, predictions), "float32"))
                paths[:] = [path for path, _ in outputs]
                return value, [out for _, out in outputs]

            _, grads, recorded = value_and_grads(loss_of, [values[i] for i in wanted])
            grads = dict(zip(wanted, grads))
            it = iter(grads.get(i) for ids in per_layer for i in ids)
            for (path, _), ids in zip(self.weighted, per_layer):
                parts = [next(it) for _ in ids]
                if all(g is None for g in parts):
                    continue
                ops = keras.ops
                norm = math.sqrt(sum(float(ops.sum(ops.square(ops.cast(g, "float32")))) for g in parts if g is not None))
                grad_sums[path] = grad_sums.get(path, 0.0) + norm
            for path, out in zip(paths, recorded):
                if path not in tallies:
                    order.append(path)
                    tallies[path] = _Tally(activation_name(self._layers[path]), thresholds.saturation_margin)
                tallies[path].add(np.asarray(out))
            examples += len(x)
        grad_norms = {path: total / len(batches) for path, total in grad_sums.items()}
        rows = self._rows(tallies, order, grad_norms)
        return DiagnosisReport(layers=tuple(rows), verdicts=tuple(verdicts(rows, thresholds, self.has_batchnorm)),
                               loss=self._loss[0], examples=examples, batches=len(batches), training=training,
                               source=source, thresholds=thresholds)

    def _resolve_loss(self, loss, y, predictions: Callable, seed: int) -> tuple[str, Callable]:
        """The loss, picked once (for a random projection, per batch); `predictions()` is called if needed."""
        if self._loss is not None and self._loss[0] != "random projection":
            return self._loss
        self._loss = _pick_loss(loss, y, predictions, getattr(self.model, "loss", None), seed)
        return self._loss

    def _rows(self, tallies: dict[str, "_Tally"], order: list[str], grad_norms: dict[str, float]) -> list[LayerHealth]:
        layers = self._layers
        weighted = [p for p in order if is_weighted(layers[p])]
        top = next((grad_norms[p] for p in reversed(weighted) if grad_norms.get(p)), None)
        rows = []
        for i, path in enumerate(order):
            layer = layers[path]
            if not is_weighted(layer):
                continue
            source = path
            if activation_name(layer) is None:  # the activation layer after it, before the next weighted one
                for later in order[i + 1:]:
                    if is_weighted(layers[later]):
                        break
                    if isinstance(layers[later], ACTIVATION_LAYERS):
                        source = later
                        break
            tally = tallies[source]
            weight_norm = math.sqrt(sum(float(np.sum(np.square(keras.ops.convert_to_numpy(w), dtype="float64")))
                                        for w in layer.weights))
            grad = grad_norms.get(path)
            rows.append(LayerHealth(
                name=path, kind=type(layer).__name__, activation=tally.activation, units=tally.units,
                trainable=bool(layer.trainable), mean=tally.mean, std=tally.std,
                saturated=tally.saturated, dead=tally.dead,
                grad_norm=grad, weight_norm=weight_norm,
                grad_to_weight=None if grad is None or weight_norm == 0 else grad / weight_norm,
                grad_to_top=None if grad is None or not top else grad / top,
                percentiles=tally.percentiles(),
            ))
        return rows


class _Tally:
    """Running figures of one layer's outputs over the batches."""

    def __init__(self, activation: str | None, margin: float):
        self.activation = activation
        self.band = None
        if activation in SATURATING:
            lo, hi = SATURATING[activation]
            self.band = (lo + margin * (hi - lo), hi - margin * (hi - lo))
        self.count = 0
        self.total = 0.0
        self.squares = 0.0
        self.near_ends = 0
        self.alive: np.ndarray | None = None
        self.units = 0
        self.samples: list[np.ndarray] = []

    def add(self, out: np.ndarray) -> None:
        flat = out.reshape(-1, out.shape[-1]).astype("float64") if out.ndim > 1 else out.reshape(-1, 1)
        self.units = flat.shape[1]
        self.count += flat.size
        self.total += float(flat.sum())
        self.squares += float(np.square(flat).sum())
        if self.band is not None:
            self.near_ends += int(np.sum((flat < self.band[0]) | (flat > self.band[1])))
        if self.activation in DYING:
            alive = np.any(flat > 0, axis=0)
            self.alive = alive if self.alive is None else self.alive | alive
        step = max(1, flat.size // _SAMPLES_PER_BATCH)
        self.samples.append(flat.reshape(-1)[::step])

    @property
    def mean(self) -> float:
        return self.total / self.count

    @property
    def std(self) -> float:
        variance = self.squares / self.count - self.mean ** 2
        return math.sqrt(max(variance, 0.0)) if math.isfinite(variance) else float("nan")

    @property
    def saturated(self) -> float | None:
        return None if self.band is None else self.near_ends / self.count

    @property
    def dead(self) -> float | None:
        return None if self.alive is None else float(1.0 - self.alive.mean())

    def percentiles(self) -> tuple[float, ...]:
        values = np.concatenate(self.samples)
        values = values[np.isfinite(values)]
        return tuple(float(v) for v in np.percentile(values, PERCENTILES)) if len(values) else (math.nan,) * 7


def _pick_loss(loss, y, predictions, compiled, seed: int) -> tuple[str, Callable]:
    """The loss as (name, fn(y_true, y_pred)); see `diagnose` for what "auto" picks.

    `predictions` is a function giving the model's outputs, called only when "auto" needs them.
    """
    ops = keras.ops
    if callable(loss):
        return getattr(loss, "__name__", type(loss).__name__), loss
    if loss not in (None, "auto"):
        return str(loss), keras.losses.get(loss)
    if y is not None and compiled is not None and isinstance(compiled, str):
        return compiled, keras.losses.get(compiled)
    out = ops.convert_to_numpy(predictions())
    if y is not None:
        y = np.asarray(y)
        if np.issubdtype(y.dtype, np.integer) and y.ndim == 1 and out.ndim == 2 and out.shape[1] > y.max():
            rows = out[np.all(np.isfinite(out), axis=1)]  # rows on the simplex are probabilities
            logits = not (np.all(rows >= 0) and np.allclose(rows.sum(axis=1), 1.0, atol=1e-3))
            name = "sparse categorical cross-entropy" + (" (logits)" if logits else "")
            return name, lambda t, p: keras.losses.sparse_categorical_crossentropy(t, p, from_logits=logits)
        if y.shape == out.shape:
            return "mean squared error", lambda t, p: ops.mean(ops.square(ops.cast(t, p.dtype) - p),
                                                              axis=tuple(range(1, len(p.shape))))
    projection = np.random.default_rng(seed).standard_normal(out.shape).astype("float32")
    projection /= math.sqrt(max(1, math.prod(out.shape[1:])))
    return "random projection", lambda t, p: ops.sum(ops.reshape(p * projection, (p.shape[0], -1)), axis=1)
