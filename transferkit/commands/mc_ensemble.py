"""MC dropout as a fixed ensemble of dropout masks: the `serve_mc` that ONNX and LiteRT can run.

Random ops do not convert to ONNX or to LiteRT's builtin ops (PITFALLS 15), so
the `serve_mc` of those formats draws no random numbers. At export,
`fixed_mask_model` replaces every dropout layer that MC dropout keeps on (see
`uncertainty.monte_carlo_model`) by `FixedMasks`: `samples` (S) dropout masks
drawn once with numpy from `seed`. `ensemble_endpoint` runs the S subnetworks
as one batched call: the batch of n inputs is repeated S times (S * n rows,
sample-major), rows `s * n ... s * n + n - 1` go through mask `s` of every
dropout layer, and the S probability vectors of each input are summarized as
`mc_predict` does: `mean`, `std` (population standard deviation over the S
samples) and `entropy` of the mean.

For each input, the S masks are S independent draws of the layer's dropout, so
the mean estimates the same MC dropout expectation as `mc_predict` with S
samples, with the same sampling error. Unlike `mc_predict`, the same S masks
serve every input and every call: the endpoint is deterministic, and two inputs'
estimates share their masks. The masks are written beside the model
(`mc_masks.npz`: per layer, a boolean `(S, *mask shape)` array, True = kept).

Example:

>>> from transferkit.commands.mc_ensemble import fixed_mask_model, ensemble_endpoint
>>> ensemble = fixed_mask_model(model, samples=30, seed=0)         # doctest: +SKIP
>>> ensemble_endpoint(ensemble, 30)(x)["mean"].shape                # doctest: +SKIP
TensorShape([8, 10])
"""

from __future__ import annotations

from collections.abc import Callable

import keras
import numpy as np
from keras import ops

from transferkit.pieces.freezing import all_layers
from transferkit.pieces.layers import MCAlphaDropout, MCDropout
from transferkit.pieces.uncertainty import monte_carlo_model, summarize_samples

# SELU's constants, as in Keras's AlphaDropout
_ALPHA_P = -1.6732632423543772848170429916717 * 1.0507009873554804934193349852946


class FixedMasks(keras.layers.Layer):
    """Dropout with `samples` masks fixed at build time, for inputs stacked sample by sample.

    The input's batch holds `samples` groups of equal size; group `s` is multiplied by mask `s`
    (kept units scaled by `1 / (1 - rate)`, or for alpha dropout, dropped units set to SELU's
    saturation and the result renormalized as in `keras.layers.AlphaDropout`). A mask covers one
    example (`noise_shape` without its batch entry, `None` entries taken from the input) and is the
    same for every example of its group. Unit `u` of mask `s` is kept when a uniform draw from
    `numpy.random.default_rng(seed)` is >= `rate`, the rule of Keras's dropout.

    Example:

    >>> layer = FixedMasks(0.5, samples=4, seed=[0, 1])
    >>> y = layer(np.ones((8, 3), "float32"))             # 4 groups of 2 rows
    >>> bool(np.all(np.asarray(y)[0] == np.asarray(y)[1]))
    True

    Args:
        rate: Float in [0, 1). Fraction of units to drop.
        samples: Integer >= 1. Number of masks (groups of the batch).
        seed: Integer or list of integers. Seed of the numpy generator of the masks.
        noise_shape: Tuple or `None`. As in `keras.layers.Dropout`. Defaults to `None`.
        alpha: Bool. Alpha dropout (for SELU) instead of dropout. Defaults to `False`.
        **kwargs: Base layer keyword arguments, such as `name`.
    """

    def __init__(self, rate: float, samples: int, seed, noise_shape=None, alpha: bool = False, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= rate < 1:
            raise ValueError(f"Expected a rate in [0, 1). Received: rate={rate}")
        if samples < 1:
            raise ValueError(f"Expected samples >= 1. Received: samples={samples}")
        self.rate = rate
        self.samples = samples
        self.seed = seed
        self.noise_shape = None if noise_shape is None else tuple(noise_shape)
        self.alpha = alpha
        self.masks = None

    def build(self, input_shape):
        example = tuple(input_shape[1:])
        shape = example if self.noise_shape is None else tuple(
            e if n is None else n for n, e in zip(self.noise_shape[1:], example))
        self.masks = np.random.default_rng(self.seed).random((self.samples, *shape)) >= self.rate

    def call(self, inputs):
        example = tuple(inputs.shape[1:])
        grouped = ops.reshape(inputs, (self.samples, -1, *example))
        keep = ops.cast(ops.convert_to_tensor(self.masks[:, None]), inputs.dtype)
        if self.alpha:
            a = ((1 - self.rate) * (1 + self.rate * _ALPHA_P ** 2)) ** -0.5
            dropped = a * (grouped * keep + _ALPHA_P * (1 - keep)) - a * _ALPHA_P * self.rate
        else:
            dropped = grouped * keep / (1 - self.rate)
        return ops.reshape(dropped, (-1, *example))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "samples": self.samples, "seed": self.seed,
                "noise_shape": self.noise_shape, "alpha": self.alpha}


def fixed_mask_model(model: keras.Model, samples: int, seed: int = 0) -> keras.Model:
    """A model sharing `model`'s weights whose MC dropout layers are `FixedMasks` of `samples` masks each.

    The dropout layers replaced are those `monte_carlo_model(model)` keeps on; the i-th of them (in
    `all_layers` order) draws its masks from `numpy.random.default_rng([seed, i])`. The result takes
    `samples * n` rows (`ensemble_endpoint` stacks them).

    Raises:
        ValueError: `model` has no dropout layer.
    """
    mc_model = monte_carlo_model(model)
    order = {id(layer): i for i, layer in enumerate(
        layer for layer in all_layers(mc_model) if type(layer) in (MCDropout, MCAlphaDropout))}

    def clone(layer):
        if id(layer) not in order:
            return layer
        return FixedMasks(layer.rate, samples, [seed, order[id(layer)]], noise_shape=layer.noise_shape,
                          alpha=isinstance(layer, MCAlphaDropout), name=layer.name)

    return keras.models.clone_model(mc_model, clone_function=clone, recursive=True)


def ensemble_endpoint(ensemble: keras.Model, samples: int) -> Callable:
    """`x` -> `{"mean", "std", "entropy"}` of `ensemble` (a `fixed_mask_model`) over its `samples` masks.

    The batch is stacked `samples` times by concatenation, not `tile`: LiteRT's converter rewrites a
    `Tile` whose copies are later split by a reshape into a broadcast and keeps the reshape, a graph
    that fails at every batch size.
    """

    def serve_mc(x):
        probabilities = ensemble(ops.concatenate([x] * samples, axis=0), training=False)
        # -1, not the batch size: ONNX's Reshape reads a 0 in the target shape as "keep this dimension"
        grouped = ops.reshape(probabilities, (samples, -1, probabilities.shape[-1]))
        mean, std, entropy, _ = summarize_samples(grouped)
        return {"mean": mean, "std": std, "entropy": entropy}

    return serve_mc


def masks_of(ensemble: keras.Model) -> dict[str, np.ndarray]:
    """Each `FixedMasks` layer's masks by layer name: boolean `(samples, *mask shape)`, True = kept."""
    return {layer.name: layer.masks for layer in all_layers(ensemble) if isinstance(layer, FixedMasks)}
