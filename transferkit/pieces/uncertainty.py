"""Monte Carlo dropout predictions and calibration metrics.

`mc_predict` keeps dropout on and BatchNorm in inference mode (calling a Keras
model with `training=True` would switch BatchNorm to batch statistics too:
tensorflow issue 60640). It runs the samples as one batched computation: each
batch is repeated `samples` times and goes through the model in one call, so
every copy draws its own dropout masks.

Example:

>>> import transferkit as tk
>>> pred = tk.mc_predict(model, x, samples=30)                 # doctest: +SKIP
>>> pred.mean.shape, pred.entropy.shape                         # doctest: +SKIP
((100, 10), (100,))
"""

from __future__ import annotations

import dataclasses

import keras
import numpy as np

from transferkit.pieces.freezing import all_layers
from transferkit.pieces.layers import MCAlphaDropout, MCDropout

EPSILON = 1e-12
_DROPOUT = (keras.layers.Dropout, keras.layers.AlphaDropout)
_TO_MC = {keras.layers.Dropout: MCDropout, keras.layers.AlphaDropout: MCAlphaDropout}
_FROM_MC = {mc: plain for plain, mc in _TO_MC.items()}


@dataclasses.dataclass(frozen=True)
class MCPrediction:
    """Monte Carlo predictions: per example, the mean class probabilities and their spread.

    Attributes:
        mean: `(n, classes)` mean probabilities over the samples.
        std: `(n, classes)` their standard deviation.
        entropy: `(n,)` predictive entropy of `mean` (nats): total uncertainty.
        mutual_information: `(n,)` entropy minus the mean entropy of each sample:
            the part of the uncertainty that comes from the model (epistemic).
    """

    mean: np.ndarray
    std: np.ndarray
    entropy: np.ndarray
    mutual_information: np.ndarray


def has_dropout(model: keras.Model) -> bool:
    """Whether any layer of `model`, nested ones included, is a dropout layer."""
    return any(isinstance(layer, _DROPOUT) for layer in all_layers(model))


def monte_carlo_model(model: keras.Model) -> keras.Model:
    """A model sharing `model`'s layers and weights in which every dropout stays on at inference."""
    if not has_dropout(model):
        raise ValueError(f"Model {model.name!r} has no dropout layer, so MC dropout would give one answer; "
                         "train it with --dropout (and --mc-dropout) first.")
    return _with_dropout_kinds(model, _TO_MC)


def deterministic_model(model: keras.Model) -> keras.Model:
    """`model`, or a model sharing its layers and weights in which MC dropout is plain dropout (off at inference).

    Called with `training=False`, the result is deterministic: no dropout, BatchNorm on its moving statistics.

    Args:
        model: A Keras model, with or without `MCDropout`/`MCAlphaDropout` layers.

    Returns:
        `model` itself when it has no MC dropout layer, else the clone.
    """
    if not any(type(layer) in _FROM_MC for layer in all_layers(model)):
        return model
    return _with_dropout_kinds(model, _FROM_MC)


def _with_dropout_kinds(model: keras.Model, kinds: dict[type, type]) -> keras.Model:
    """A clone sharing `model`'s layers and weights, with each dropout layer of a type in `kinds` swapped."""

    def clone(layer):
        kind = kinds.get(type(layer))
        if kind is None:
            return layer
        return kind(layer.rate, noise_shape=layer.noise_shape, seed=layer.seed, name=layer.name,
                    dtype=layer.dtype_policy)

    return keras.models.clone_model(model, clone_function=clone, recursive=True)


def summarize_samples(probabilities):
    """Mean, std, entropy and mutual information of `(samples, n, classes)` probabilities (keras.ops)."""
    ops = keras.ops
    mean = ops.mean(probabilities, axis=0)
    std = ops.std(probabilities, axis=0)
    entropy = -ops.sum(mean * ops.log(mean + EPSILON), axis=-1)
    expected = -ops.mean(ops.sum(probabilities * ops.log(probabilities + EPSILON), axis=-1), axis=0)
    return mean, std, entropy, entropy - expected


def mc_samples(mc_model: keras.Model, x, samples: int):
    """`(samples, n, classes)` probabilities from one call on `x` repeated `samples` times (keras.ops)."""
    ops = keras.ops
    n = ops.shape(x)[0]
    tiled = ops.tile(x, [samples] + [1] * (len(x.shape) - 1))
    probabilities = mc_model(tiled, training=False)
    return ops.reshape(probabilities, (samples, n, probabilities.shape[-1] or -1))


def mc_predict(model: keras.Model, x, samples: int = 30, batch_size: int = 128,
               mc_model: keras.Model | None = None) -> MCPrediction:
    """MC dropout predictions of `model` on `x`: dropout on, BatchNorm in inference mode.

    Args:
        model: A Keras classifier with dropout layers (plain or MC).
        x: Array of inputs.
        samples: Integer. Dropout samples per example. Defaults to `30`.
        batch_size: Integer. Examples per call; each call holds `batch_size * samples` rows.
        mc_model: Optional. A `monte_carlo_model(model)` to reuse across calls.

    Returns:
        An `MCPrediction`.
    """
    if samples < 2:
        raise ValueError(f"samples must be at least 2 for a spread. Received: samples={samples}")
    mc_model = mc_model or monte_carlo_model(model)
    parts = []
    for start in range(0, len(x), batch_size):
        chunk = keras.ops.convert_to_tensor(np.asarray(x[start:start + batch_size], dtype="float32"))
        parts.append([keras.ops.convert_to_numpy(v) for v in summarize_samples(mc_samples(mc_model, chunk, samples))])
    return MCPrediction(*(np.concatenate(column) for column in zip(*parts)))


def calibration(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> dict[str, float]:
    """Accuracy, negative log-likelihood and expected calibration error (equal-width confidence bins)."""
    probabilities = np.asarray(probabilities, dtype="float64")
    labels = np.asarray(labels)
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == labels
    nll = -np.mean(np.log(np.clip(probabilities[np.arange(len(labels)), labels], EPSILON, None)))
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, bins - 1)
    ece = sum(abs(correct[which == b].mean() - confidence[which == b].mean()) * np.mean(which == b)
              for b in range(bins) if np.any(which == b))
    return {"accuracy": float(correct.mean()), "nll": float(nll), "ece": float(ece)}
