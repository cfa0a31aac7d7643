"""Diagnose unstable training: per-layer activations and gradients, verdicts and remedies.

`diagnose(model, data)` runs a few batches forward and backward and reports,
for every layer with weights (Dense, Conv, ...): the mean and std of the
activation that follows it, the fraction of saturated outputs (sigmoid/tanh
near an asymptote), the fraction of dead units (ReLU outputs zero for every
example), the gradient norm, its ratio to the weight norm and to the top
layer's gradient norm. Then it gives verdicts (vanishing or exploding
gradients, saturation, dead units, broken self-normalization), each naming
the layers and the chapter's remedies in order with the flag that applies them.

The passes run on copies of the variables (`stateless_call`), so BatchNorm's
moving statistics and dropout's random state are left as they were; by
default BatchNorm and dropout run in training mode, as during `fit`.

Example:

>>> import keras, numpy as np
>>> from transferkit.commands.diagnose import diagnose
>>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4, activation="relu"),
...                           keras.layers.Dense(3, activation="softmax")])
>>> x, y = np.random.randn(64, 8).astype("float32"), np.random.randint(0, 3, 64)
>>> report = diagnose(model, (x, y), batches=2)
>>> [row.name for row in report.layers]
['dense', 'dense_1']
>>> print(report.format())                                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit.store import artifacts
from transferkit.training import backend
from transferkit.errors import SettingsError, TransferkitError
from transferkit.pieces.layers import RReLU

# activation -> its output range; outputs within `saturation_margin` of the range from an end are saturated
SATURATING = {"sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0),
              "hard_tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}
# activations whose inactive units output exactly zero, so a unit can die
DYING = ("relu", "relu6")
ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU, keras.layers.ELU,
                     keras.layers.PReLU, keras.layers.Softmax, RReLU)
NORMALIZATION_LAYERS = (keras.layers.BatchNormalization, keras.layers.LayerNormalization,
                        keras.layers.GroupNormalization, keras.layers.Normalization)
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)
_SAMPLES_PER_BATCH = 4096


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where a figure becomes a verdict. Every field is stated in the report.

    Attributes:
        vanishing: A layer's gradient norm below this times the top layer's. Defaults to `1e-2`.
        exploding: A layer's gradient norm above this times the top layer's, or above this
            times its own weight norm. Defaults to `1e2`.
        saturated: Fraction of a hidden layer's outputs that are saturated. Defaults to `0.2`.
        saturation_margin: An output is saturated within this fraction of the activation's
            range from an asymptote (sigmoid < 0.01 or > 0.99). Defaults to `0.01`.
        dead: Fraction of a hidden ReLU layer's units that output zero for every example.
            Defaults to `0.75` (at He init the deepest layers of a 50-layer ReLU net already show
            up to about 60% silent units on a batch, because inputs grow alike with depth).
        selu_mean: Largest |mean| of a SELU layer's outputs. Defaults to `0.3`.
        selu_std: Range of the std of a SELU layer's outputs. Defaults to `(0.5, 1.5)`.
    """

    vanishing: float = 1e-2
    exploding: float = 1e2
    saturated: float = 0.2
    saturation_margin: float = 0.01
    dead: float = 0.75
    selu_mean: float = 0.3
    selu_std: tuple[float, float] = (0.5, 1.5)

    def describe(self) -> dict[str, str]:
        """Each verdict's rule, in words."""
        lo, hi = self.selu_std
        return {
            "vanishing_gradients": f"gradient norm < {self.vanishing:g} x the top layer's",
            "exploding_gradients": f"gradient norm > {self.exploding:g} x the top layer's or x its weight norm, "
                                   "or non-finite",
            "saturation": f"> {self.saturated:.0%} of outputs within {self.saturation_margin:.0%} of the range "
                          "from an asymptote",
            "dead_units": f"> {self.dead:.0%} of units output zero for every example",
            "self_normalization": f"SELU output |mean| > {self.selu_mean:g} or std outside [{lo:g}, {hi:g}]",
        }


# remedy -> what to do, and the flag that does it; verdicts list them in the chapter's order
REMEDIES = {
    "initializer": "an initializer that matches the activation (Glorot for sigmoid/tanh, He for the ReLU "
                   "family, LeCun for SELU): transferkit picks it from --activation; in Keras, kernel_initializer=",
    "activation": "a non-saturating activation: --activation relu (or elu, selu)",
    "leaky": "an activation whose units cannot die: --activation leaky_relu (or elu, selu)",
    "batchnorm": "BatchNorm: --batchnorm before (or after)",
    "clipping": "gradient clipping: --clipnorm 1.0 (or --clipvalue 1.0)",
    "learning_rate": "a lower learning rate: --lr (a tenth), or a warm-up with --schedule onecycle, "
                     "or an adaptive --optimizer such as nadam",
    "selu_setup": "SELU's own setup: --activation selu gives LeCun init and alpha dropout; keep inputs "
                  "standardized, --batchnorm none, no --max-norm",
}
VERDICT_REMEDIES = {
    "vanishing_gradients": ("initializer", "activation", "batchnorm"),
    "exploding_gradients": ("initializer", "batchnorm", "clipping", "learning_rate"),
    "saturation": ("initializer", "activation", "batchnorm"),
    "dead_units": ("initializer", "leaky", "batchnorm", "learning_rate"),
    "self_normalization": ("selu_setup",),
}


@dataclasses.dataclass(frozen=True)
class LayerHealth:
    """The figures of one layer with weights; `None` where a figure does not apply.

    Attributes:
        name: the layer's path, `outer/inner` for a nested model.
        kind: the layer's class name.
        activation: the activation measured (its own, or the activation layer after it), or `None`.
        units: size of the last axis of that activation.
        trainable: whether the layer is trainable (gradients are measured either way).
        mean, std: of the activation's outputs over all examples and units.
        saturated: fraction of outputs near an asymptote (saturating activations).
        dead: fraction of units that are zero for every example (ReLU, ReLU6).
        grad_norm: L2 norm of the gradient of the layer's weights, mean over batches.
        weight_norm: L2 norm of the layer's weights.
        grad_to_weight: `grad_norm / weight_norm`.
        grad_to_top: `grad_norm` over the top (last) layer's.
        percentiles: the activation's 1, 5, 25, 50, 75, 95 and 99th percentiles.
    """

    name: str
    kind: str
    activation: str | None
    units: int
    trainable: bool
    mean: float
    std: float
    saturated: float | None
    dead: float | None
    grad_norm: float | None
    weight_norm: float
    grad_to_weight: float | None
    grad_to_top: float | None
    percentiles: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A problem found: its kind, the layers, the rule that fired and the remedies in order."""

    kind: str
    layers: tuple[str, ...]
    rule: str
    detail: str
    remedies: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.kind.replace("_", " ")

    def summary(self) -> str:
        """One line: kind, rule, layers."""
        names = ", ".join(self.layers[:4]) + (f", ... ({len(self.layers)} layers)" if len(self.layers) > 4 else "")
        return f"{self.title} ({self.rule}) in {names}{'; ' + self.detail if self.detail else ''}"

    def format(self) -> str:
        steps = "\n".join(f"    {i}. {REMEDIES[r]}" for i, r in enumerate(self.remedies, start=1))
        return f"  {self.summary()}\n    remedies, in order:\n{steps}"


@dataclasses.dataclass(frozen=True)
class DiagnosisReport:
    """What `diagnose` found: one `LayerHealth` per layer with weights, bottom to top, and the verdicts."""

    layers: tuple[LayerHealth, ...]
    verdicts: tuple[Verdict, ...]
    loss: str
    examples: int
    batches: int
    training: bool
    source: str
    thresholds: Thresholds

    @property
    def healthy(self) -> bool:
        return not self.verdicts

    def verdict(self, kind: str) -> Verdict | None:
        """The verdict of `kind` (e.g. `"vanishing_gradients"`), or `None`."""
        return next((v for v in self.verdicts if v.kind == kind), None)

    def layer(self, name: str) -> LayerHealth:
        return next(row for row in self.layers if row.name == name)

    def summary(self) -> dict[str, float]:
        """Scalars for a training history: gradient ratios, worst saturation and dead fraction, verdicts."""
        def worst(values, pick=max):
            values = [v for v in values if v is not None]
            return float(pick(values)) if values else float("nan")

        rows = self.layers
        return {
            "first_to_top": rows[0].grad_to_top if rows and rows[0].grad_to_top is not None else float("nan"),
            "min_grad_to_top": worst((r.grad_to_top for r in rows), min),
            "max_grad_to_top": worst(r.grad_to_top for r in rows),
            "max_grad_to_weight": worst(r.grad_to_weight for r in rows),
            "max_saturated": worst(r.saturated for r in rows[:-1]),
            "max_dead": worst(r.dead for r in rows[:-1]),
            "verdicts": float(len(self.verdicts)),
        }

    def format(self) -> str:
        """The table, the verdicts with their remedies, and the thresholds."""
        width = max([len("layer")] + [len(r.name) + (not r.trainable) for r in self.layers])
        mode = "training" if self.training else "inference"
        lines = [f"diagnose: {self.batches} batches, {self.examples} examples ({self.source}); loss {self.loss}; "
                 f"BatchNorm and dropout in {mode} mode",
                 f"{'layer':<{width}}  {'activation':<11}{'units':>6}{'mean':>9}{'std':>9}{'saturated':>10}"
                 f"{'dead':>7}{'grad norm':>11}{'grad/weight':>12}{'grad/top':>10}"]
        for r in self.layers:
            lines.append(f"{r.name + ('' if r.trainable else '*'):<{width}}  {r.activation or 'linear':<11}{r.units:>6}"
                         f"{r.mean:>9.3f}{r.std:>9.3f}{_pct(r.saturated):>10}{_pct(r.dead):>7}"
                         f"{_sci(r.grad_norm):>11}{_sci(r.grad_to_weight):>12}{_sci(r.grad_to_top):>10}")
        if any(not r.trainable for r in self.layers):
            lines.append("* frozen layer (its gradient is measured as if it trained)")
        if self.verdicts:
            lines.append("verdicts:")
            lines.extend(v.format() for v in self.verdicts)
        else:
            lines.append("verdicts: none (healthy at these thresholds)")
        lines.append("thresholds: " + "; ".join(f"{k.replace('_', ' ')}: {v}"
                                                for k, v in self.thresholds.describe().items()))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write the per-layer gradient and activation figure as a PNG (see `plot_report`)."""
        return plot_report(self, path)


def diagnose(
    model: keras.Model | str | Path,
    data: Any = None,
    batches: int = 4,
    *,
    batch_size: int = 32,
    loss: str | Callable | None = "auto",
    training: bool = True,
    seed: int = 0,
    thresholds: Thresholds | None = None,
) -> DiagnosisReport:
    """Per-layer activation and gradient figures of `model` on a few batches, with verdicts.

    Example:

    >>> report = diagnose("saved_models/digits-classifier")            # doctest: +SKIP
    >>> report.healthy, [v.kind for v in report.verdicts]               # doctest: +SKIP
    (True, [])

    Args:
        model: A Keras model, a transferkit artifact folder, or a `.keras` file.
        data: `(x, y)` arrays (`y` may be `None`), an array of inputs, a batched
            `tf.data.Dataset` of `(x, y)` or `x`, or a data spec string. For an
            artifact it defaults to the training split of the artifact's data;
            a `.keras` file needs it. Arrays are sampled with `seed`.
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

    Returns:
        A `DiagnosisReport`.

    Raises:
        SettingsError: a model path that is neither an artifact nor a `.keras`
            file, data that does not fit the model, `batches` < 1.
    """
    check_count("batches", batches)
    check_count("batch_size", batch_size)
    model, data, source, drop_labels = _resolve(model, data)
    prepared = prepare_batches(data, batches, batch_size, seed)
    if drop_labels:
        prepared = [(x, None) for x, _ in prepared]
    _check_fits(model, prepared[0][0])
    return Probe(model).run(prepared, loss=loss, training=training, seed=seed,
                            thresholds=thresholds or Thresholds(), source=source)


def prepare_batches(data: Any, batches: int, batch_size: int = 32, seed: int = 0) -> list[tuple[np.ndarray, Any]]:
    """Up to `batches` fixed `(x, y)` numpy batches from arrays, a Dataset or a data spec.

    Arrays (and image files, of which only the sampled rows are decoded) are
    sampled without replacement with `seed`; a Dataset's first `batches`
    batches are taken as they come.

    Example:

    >>> [x.shape for x, _ in prepare_batches((np.zeros((70, 3)), None), batches=4, batch_size=32)]
    [(32, 3), (32, 3), (6, 3)]
    """
    import tensorflow as tf

    if isinstance(data, str):
        from transferkit.data.sources import load_data

        loaded = load_data(data)
        data = (loaded.x, loaded.y)
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
    from transferkit.data.sources import rows_of
    from transferkit.data.image_files import ImageFiles

    x, y = (data[0], data[1]) if isinstance(data, (tuple, list)) and len(data) == 2 else (data, None)
    x = x if isinstance(x, ImageFiles) else np.asarray(x)  # image files: only the sampled rows are decoded
    if x.ndim < 2 or len(x) == 0:
        raise SettingsError(f"Inputs must be a non-empty batch of examples. Received: x with shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise SettingsError(f"Inputs and labels disagree: {len(x)} inputs but {len(y)} labels.")
    order = np.random.default_rng(seed).permutation(len(x))[: batches * batch_size]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    return [(rows_of(x, c).astype("float32"), None if y is None else np.asarray(y)[c]) for c in chunks]


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
        self.leaves = list(_leaves(model))
        self._layers = dict(self.leaves)
        self.weighted = [(path, layer) for path, layer in self.leaves if _is_weighted(layer)]
        self.watched = {id(layer): path for path, layer in self.leaves
                        if _is_weighted(layer) or isinstance(layer, ACTIVATION_LAYERS)}
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
                with _recording(self.leaves, self.watched) as outputs:
                    predictions, _ = model.stateless_call(full[:count], full[count:], x, training=training)
                    value = keras.ops.mean(keras.ops.cast(fn(y, predictions), "float32"))
                paths[:] = [path for path, _ in outputs]
                return value, [out for _, out in outputs]

            _, grads, recorded = backend.value_and_grads(loss_of, [values[i] for i in wanted])
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
                    tallies[path] = _Tally(_activation_name(self._layers[path]), thresholds.saturation_margin)
                tallies[path].add(np.asarray(out))
            examples += len(x)
        grad_norms = {path: total / len(batches) for path, total in grad_sums.items()}
        rows = self._rows(tallies, order, grad_norms, thresholds)
        return DiagnosisReport(layers=tuple(rows), verdicts=tuple(_verdicts(rows, self.model, thresholds)),
                               loss=self._loss[0], examples=examples, batches=len(batches), training=training,
                               source=source, thresholds=thresholds)

    def _resolve_loss(self, loss, y, predictions: Callable, seed: int) -> tuple[str, Callable]:
        """The loss, picked once (for a random projection, per batch); `predictions()` is called if needed."""
        if self._loss is not None and self._loss[0] != "random projection":
            return self._loss
        self._loss = _pick_loss(loss, y, predictions, getattr(self.model, "loss", None), seed)
        return self._loss

    def _rows(self, tallies: dict[str, "_Tally"], order: list[str], grad_norms: dict[str, float],
              thresholds: Thresholds) -> list[LayerHealth]:
        layers = self._layers
        weighted = [p for p in order if _is_weighted(layers[p])]
        top = next((grad_norms[p] for p in reversed(weighted) if grad_norms.get(p)), None)
        rows = []
        for i, path in enumerate(order):
            layer = layers[path]
            if not _is_weighted(layer):
                continue
            source = path
            if _activation_name(layer) is None:  # the activation layer after it, before the next weighted one
                for later in order[i + 1:]:
                    if _is_weighted(layers[later]):
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


def _verdicts(rows: list[LayerHealth], model: keras.Model, t: Thresholds) -> list[Verdict]:
    rules = t.describe()
    hidden = rows[:-1]
    found: list[Verdict] = []

    def add(kind: str, names: list[str], detail: str = "", skip: tuple[str, ...] = ()) -> None:
        if names:
            remedies = tuple(r for r in VERDICT_REMEDIES[kind] if r not in skip)
            found.append(Verdict(kind, tuple(names), rules[kind], detail, remedies))

    has_bn = any(isinstance(layer, keras.layers.BatchNormalization) for _, layer in _leaves(model))
    no_bn = ("batchnorm",) if has_bn else ()
    vanishing = [r for r in rows if r.grad_to_top is not None and r.grad_to_top < t.vanishing]
    first = rows[0] if rows else None
    ratio = f"first/top {_sci(first.grad_to_top)}" if first and first.grad_to_top is not None else ""
    non_saturating = all(r.activation not in SATURATING for r in vanishing)
    add("vanishing_gradients", [r.name for r in vanishing], ratio,
        skip=no_bn + (("activation",) if non_saturating else ()))
    non_finite = [r for r in rows if not _finite(r.grad_norm, r.mean, r.std)]
    exploding = non_finite or [r for r in rows if (r.grad_to_top or 0) > t.exploding or (r.grad_to_weight or 0) > t.exploding]
    detail = "non-finite gradients or activations" if non_finite else (
        f"largest grad/top {_sci(max((r.grad_to_top or 0) for r in exploding))}, "
        f"largest grad/weight {_sci(max((r.grad_to_weight or 0) for r in exploding))}" if exploding else "")
    add("exploding_gradients", [r.name for r in exploding], detail, skip=no_bn)
    saturated = [r for r in hidden if r.saturated is not None and r.saturated > t.saturated]
    add("saturation", [r.name for r in saturated],
        f"up to {max((r.saturated for r in saturated), default=0):.0%} saturated", skip=no_bn)
    dead = [r for r in hidden if r.dead is not None and r.dead > t.dead]
    add("dead_units", [r.name for r in dead], f"up to {max((r.dead for r in dead), default=0):.0%} dead", skip=no_bn)
    lo, hi = t.selu_std
    drifting = [r for r in hidden if r.activation == "selu" and _finite(r.mean, r.std)
                and (abs(r.mean) > t.selu_mean or not lo <= r.std <= hi)]
    add("self_normalization", [r.name for r in drifting],
        ", ".join(f"{r.name} mean {r.mean:.2f} std {r.std:.2f}" for r in drifting[:2]))
    return found


def plot_report(report: DiagnosisReport, path: str | Path, title: str | None = None) -> Path:
    """Write `report_figure(report)` as a PNG, through a temporary sibling file and a rename.

    Example:

    >>> plot_report(diagnose(model, (x, y)), "health.png")            # doctest: +SKIP
    PosixPath('health.png')
    """
    from transferkit.store.pictures import save_figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(report_figure(report, title), path, dpi=80)


def report_figure(report: DiagnosisReport, title: str | None = None):
    """Per-layer gradient norms and activation distributions: a `matplotlib.figure.Figure` (Agg).

    Four panels, bottom layer on the left: gradient norm relative to the top
    layer's and to the layer's own weights (log scale, verdict zones shaded),
    the activation's percentile bands (1-99, 5-95, 25-75, median) and mean,
    and the saturated and dead fractions with their thresholds.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, t = report.layers, report.thresholds
    idx = np.arange(len(rows))
    fig = Figure(figsize=(11, 7), dpi=80)
    FigureCanvasAgg(fig)
    (ax_top, ax_weight), (ax_act, ax_frac) = fig.subplots(2, 2, sharex=True)

    def log_panel(ax, values, low, high, label):
        finite = np.array([np.nan if v is None or not np.isfinite(v) or v <= 0 else v for v in values], dtype=float)
        bottom, top = _log_limits(values, low, high)
        ax.set_ylim(bottom, top)
        for lo, hi in ((bottom, low), (high, top)):
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color="tab:red", alpha=0.12, lw=0)
        ax.semilogy(idx, finite, "o-", ms=3, lw=1)
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)

    log_panel(ax_top, [r.grad_to_top for r in rows], t.vanishing, t.exploding, "gradient norm / top layer's")
    log_panel(ax_weight, [r.grad_to_weight for r in rows], None, t.exploding, "gradient norm / weight norm")
    p = np.array([r.percentiles for r in rows], dtype=float).reshape(len(rows), len(PERCENTILES))
    for (lo, hi), alpha in (((0, 6), 0.15), ((1, 5), 0.25), ((2, 4), 0.4)):
        ax_act.fill_between(idx, p[:, lo], p[:, hi], color="tab:blue", alpha=alpha, lw=0)
    ax_act.plot(idx, p[:, 3], color="tab:blue", lw=1.2, label="median; bands 25-75, 5-95, 1-99%")
    ax_act.plot(idx, [r.mean for r in rows], color="k", lw=0.8, ls="--", label="mean")
    ax_act.set_ylabel("activation")
    ax_act.legend(fontsize=7, loc="upper right")
    ax_act.grid(True, alpha=0.3)
    width = 0.4
    ax_frac.bar(idx - width / 2, [r.saturated or 0 for r in rows], width, label="saturated", color="tab:orange")
    ax_frac.bar(idx + width / 2, [r.dead or 0 for r in rows], width, label="dead", color="tab:gray")
    ax_frac.axhline(t.saturated, color="tab:orange", ls=":", lw=1, label="saturation threshold")
    ax_frac.axhline(t.dead, color="tab:gray", ls=":", lw=1, label="dead threshold")
    ax_frac.set_ylim(0, 1.02)
    ax_frac.set_ylabel("fraction")
    ax_frac.legend(fontsize=7, loc="upper right")
    step = max(1, len(rows) // 12)
    for ax in (ax_act, ax_frac):
        ax.set_xticks(idx[::step])
        ax.set_xticklabels([rows[i].name.split("/")[-1] for i in idx[::step]], rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("layer, bottom to top", fontsize=8)
    verdicts = ", ".join(f"{v.title} ({len(v.layers)})" for v in report.verdicts) or "no verdict"
    fig.suptitle(title or f"{len(rows)} layers, bottom to top: {verdicts}", fontsize=11)
    fig.tight_layout()
    return fig


def _resolve(model, data) -> tuple[keras.Model, Any, str, bool]:
    """The model, its data, a description of the data, and whether labels are to be ignored."""
    if isinstance(model, keras.Model):
        return model, data, "given data" if not isinstance(data, str) else data, False
    import transferkit.pieces.schedules  # noqa: F401  registers OneCycle, which compiled artifacts' optimizers name

    path = Path(model)
    if path.is_dir():
        manifest = artifacts.read_manifest(path)
        loaded_model = artifacts.load_model(path)
        encoder = manifest["kind"] == "encoder"
        if data is None or isinstance(data, str):
            data, source = _artifact_data(path, manifest, data)
        else:
            source = "given data"
        return loaded_model, data, source, encoder
    if path.is_file() and path.suffix == ".keras":
        if data is None:
            raise SettingsError(f"Model {str(path)!r} is a .keras file; pass the data to diagnose it on (--data SPEC).")
        try:
            loaded_model = keras.saving.load_model(path)
        except Exception as err:  # a truncated zip, a bad config, an unregistered class
            raise TransferkitError(f"{str(path)!r} could not be loaded: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return loaded_model, data, data if isinstance(data, str) else "given data", False
    raise SettingsError(f"Model {str(path)!r} is neither a transferkit artifact folder nor a .keras file.")


def _artifact_data(path: Path, manifest: dict[str, Any], spec: str | None) -> tuple[tuple, str]:
    """The artifact's training split (never its test split); all of other data."""
    from transferkit.training import runs
    from transferkit.data.sources import Split

    spec = spec or manifest["data"]["spec"]
    loaded = runs.load_like_artifact(spec, manifest)
    if loaded.input_shape != tuple(manifest["input_shape"]):
        raise SettingsError(f"The data's inputs have shape {loaded.input_shape}; the model in {str(path)!r} "
                            f"takes {tuple(manifest['input_shape'])}.")
    if loaded.fingerprint == manifest["data"]["fingerprint"]:
        train = Split.from_dict(artifacts.read_json(path, artifacts.SPLIT)).train
        return (loaded.x[train], None if loaded.y is None else loaded.y[train]), f"training split of {spec}"
    return (loaded.x, loaded.y), f"all of {spec}"


def _check_fits(model: keras.Model, x: np.ndarray) -> None:
    expected = tuple(model.inputs[0].shape[1:]) if getattr(model, "inputs", None) else None
    if expected and (len(expected) != x.ndim - 1 or any(e not in (None, a) for e, a in zip(expected, x.shape[1:]))):
        raise SettingsError(f"The data's inputs have shape {tuple(x.shape[1:])}; the model takes {expected}.")


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


def _leaves(model: keras.Layer, prefix: str = "") -> Iterator[tuple[str, keras.Layer]]:
    """(path, layer) for each layer that is not a model, descending into nested models."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            yield from _leaves(layer, f"{prefix}{layer.name}/")
        else:
            yield f"{prefix}{layer.name}", layer


def _is_weighted(layer: keras.Layer) -> bool:
    return bool(layer.weights) and not isinstance(layer, ACTIVATION_LAYERS + NORMALIZATION_LAYERS)


def _activation_name(layer: keras.Layer) -> str | None:
    """The nonlinearity a layer applies to its output, by name, or `None` for none."""
    if isinstance(layer, keras.layers.ReLU):
        if layer.negative_slope:
            return "leaky_relu"
        return "relu6" if layer.max_value == 6 else "relu"
    fixed = {keras.layers.LeakyReLU: "leaky_relu", keras.layers.ELU: "elu", keras.layers.PReLU: "prelu",
             keras.layers.Softmax: "softmax", RReLU: "rrelu"}
    for cls, name in fixed.items():
        if isinstance(layer, cls):
            return name
    name = getattr(getattr(layer, "activation", None), "__name__", None)
    return None if name in (None, "linear") else name


@contextlib.contextmanager
def _recording(leaves: list[tuple[str, keras.Layer]], watched: dict[int, str]) -> Iterator[list]:
    """Record (path, output) of each watched layer call, in call order; restore the layers afterwards."""
    outputs: list[tuple[str, Any]] = []
    wrapped = []

    def wrap(layer, path):
        original = layer.call

        def call(*args, **kwargs):
            out = original(*args, **kwargs)
            outputs.append((path, out))
            return out

        layer.__dict__["call"] = call  # past Keras's attribute tracking, removed in `finally`
        wrapped.append(layer)

    try:
        for path, layer in leaves:
            if id(layer) in watched:
                wrap(layer, path)
        yield outputs
    finally:
        for layer in wrapped:
            layer.__dict__.pop("call", None)


def check_count(name: str, value: Any, minimum: int = 1) -> None:
    """Raise a `SettingsError` unless `value` is an integer >= `minimum`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SettingsError(f"{name} must be an integer >= {minimum}. Received: {name}={value!r}")


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _log_limits(values, low: float | None, high: float | None) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    lo = min(finite + [low or 1.0]) / 3
    hi = max(finite + [high or 1.0]) * 3
    return lo, hi


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
