"""Activation setups: what goes with each activation, and stacks built from them.

The chapter "Training Deep Neural Networks" pairs each activation with an
initializer, a kind of dropout and a BatchNorm policy. `ACTIVATION_SETUPS` is
that table as data; `dense_stack` and `conv_stack` build layers from it.

Example:

>>> import keras
>>> from transferkit import dense_stack, setup_for
>>> setup_for("selu").initializer
'lecun_normal'
>>> model = keras.Sequential([keras.Input((64,)), *dense_stack([32, 16], activation="selu"),
...                           keras.layers.Dense(10, activation="softmax")])
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Literal

import keras

from transferkit.errors import SettingsError


@dataclasses.dataclass(frozen=True)
class ActivationSetup:
    """What goes with one activation.

    Attributes:
        activation: the activation's name.
        initializer: the Keras initializer that keeps signal variance stable for it.
        dropout: `"alpha"` (AlphaDropout, keeps self-normalization) or `"plain"`.
        batchnorm: whether BatchNorm fits this activation (SELU nets go without).
        standardize_inputs: whether inputs must be standardized (mean 0, std 1).
    """

    activation: str
    initializer: str
    dropout: Literal["alpha", "plain"] = "plain"
    batchnorm: bool = True
    standardize_inputs: bool = False


def _setups(names: tuple[str, ...], **kwargs: Any) -> dict[str, ActivationSetup]:
    return {name: ActivationSetup(name, **kwargs) for name in names}


ACTIVATION_SETUPS: dict[str, ActivationSetup] = {
    **_setups(("selu",), initializer="lecun_normal", dropout="alpha", batchnorm=False, standardize_inputs=True),
    **_setups(("relu", "leaky_relu", "prelu", "rrelu", "elu", "gelu", "swish", "mish"), initializer="he_normal"),
    **_setups(("tanh", "sigmoid", "softmax", "linear"), initializer="glorot_uniform"),
}

ACTIVATIONS = tuple(ACTIVATION_SETUPS)
BATCHNORM_PLACEMENTS = (None, "before", "after")


def setup_for(activation: str) -> ActivationSetup:
    """The setup that goes with `activation` (see `ACTIVATION_SETUPS`).

    Example:

    >>> setup_for("relu").initializer
    'he_normal'

    Raises:
        SettingsError: `activation` is not in the table.
    """
    try:
        return ACTIVATION_SETUPS[activation]
    except KeyError:
        raise SettingsError(
            f"Unknown activation {activation!r}; expected one of {', '.join(ACTIVATIONS)}. "
            f"Received: activation={activation!r}"
        ) from None


def activation_layer(activation: str, name: str | None = None) -> keras.layers.Layer:
    """A layer applying `activation`, including the ones that are layers (PReLU, RReLU)."""
    setup_for(activation)
    if activation == "prelu":
        return keras.layers.PReLU(name=name)
    if activation == "rrelu":
        from transferkit.pieces.layers import RReLU

        return RReLU(name=name)
    return keras.layers.Activation("silu" if activation == "swish" else activation, name=name)


def dropout_layer(rate: float, kind: Literal["alpha", "plain"] = "plain", mc_dropout: bool = False,
                  name: str | None = None) -> keras.layers.Layer:
    """Alpha (for SELU) or plain dropout; with `mc_dropout`, one that stays on at inference."""
    from transferkit.pieces.layers import MCAlphaDropout, MCDropout

    kinds = {
        ("alpha", False): keras.layers.AlphaDropout,
        ("alpha", True): MCAlphaDropout,
        ("plain", False): keras.layers.Dropout,
        ("plain", True): MCDropout,
    }
    return kinds[(kind, mc_dropout)](rate, name=name)


def dense_stack(
    units: list[int] | tuple[int, ...],
    activation: str = "selu",
    batchnorm: Literal["before", "after"] | None = None,
    dropout: float = 0.0,
    mc_dropout: bool = False,
    max_norm: float | None = None,
    kernel_regularizer: Any = None,
    name: str | None = None,
) -> list[keras.layers.Layer]:
    """Dense blocks set up for `activation`: initializer, dropout kind, BatchNorm placement.

    Each block is `Dense → activation` with, as asked, BatchNorm before the
    activation (the Dense then has no bias) or after it, and dropout last.
    Layer names are `{name}block{i}_{part}` so blocks can be found again.

    Example:

    >>> layers = dense_stack([300, 100], activation="relu", batchnorm="after")
    >>> [l.__class__.__name__ for l in layers][:3]
    ['Dense', 'Activation', 'BatchNormalization']

    Args:
        units: List of integers. Units of each Dense layer, bottom to top.
        activation: String. A name from `ACTIVATION_SETUPS`. Defaults to `"selu"`.
        batchnorm: `None`, `"before"` or `"after"` the activation. Defaults to `None`.
        dropout: Float. Dropout rate after each block. Defaults to `0.0`.
        mc_dropout: Bool. Use dropout that stays on at inference. Defaults to `False`.
        max_norm: Optional float. Max-norm constraint on each kernel. Defaults to `None`.
        kernel_regularizer: Optional regularizer for each kernel. Defaults to `None`.
        name: Optional string prefix of the layer names. Defaults to `None`.

    Returns:
        A list of layers, to unpack into a `keras.Sequential` or apply in order.
    """
    return _stack(keras.layers.Dense, list(units), {}, activation, batchnorm, dropout, mc_dropout,
                  max_norm, kernel_regularizer, name, pool=False)


def conv_stack(
    filters: list[int] | tuple[int, ...],
    activation: str = "selu",
    batchnorm: Literal["before", "after"] | None = None,
    dropout: float = 0.0,
    mc_dropout: bool = False,
    max_norm: float | None = None,
    kernel_regularizer: Any = None,
    name: str | None = None,
    kernel_size: int = 3,
    pool: bool = True,
) -> list[keras.layers.Layer]:
    """Conv2D blocks set up for `activation`, each ending in 2x2 max pooling.

    The same choices as `dense_stack`; `kernel_size` and `pool` shape the convolutions.

    Example:

    >>> layers = conv_stack([16, 32], activation="relu")
    >>> [l.__class__.__name__ for l in layers][:3]
    ['Conv2D', 'Activation', 'MaxPooling2D']
    """
    conv_kwargs = {"kernel_size": kernel_size, "padding": "same"}
    return _stack(keras.layers.Conv2D, list(filters), conv_kwargs, activation, batchnorm, dropout, mc_dropout,
                  max_norm, kernel_regularizer, name, pool=pool)


def _stack(layer_cls, sizes, layer_kwargs, activation, batchnorm, dropout, mc_dropout,
           max_norm, kernel_regularizer, name, pool) -> list[keras.layers.Layer]:
    setup = setup_for(activation)
    batchnorm = None if batchnorm == "none" else batchnorm
    if batchnorm not in BATCHNORM_PLACEMENTS:
        raise SettingsError(f"batchnorm must be None, 'before' or 'after'. Received: batchnorm={batchnorm!r}")
    if not 0 <= dropout < 1:
        raise SettingsError(f"dropout must be in [0, 1). Received: dropout={dropout!r}")
    if max_norm is not None and max_norm <= 0:
        raise SettingsError(f"max_norm must be positive. Received: max_norm={max_norm!r}")
    if setup.activation == "selu":
        _warn_if_not_self_normalizing(batchnorm, max_norm, kernel_regularizer)
    prefix = name or ""
    kind = layer_cls.__name__.lower()
    layers: list[keras.layers.Layer] = []
    for i, size in enumerate(sizes, start=1):
        block = f"{prefix}block{i}_"
        layers.append(layer_cls(
            size,
            use_bias=batchnorm != "before",
            kernel_initializer=setup.initializer,
            kernel_constraint=keras.constraints.MaxNorm(max_norm) if max_norm else None,
            kernel_regularizer=kernel_regularizer,
            name=block + kind,
            **layer_kwargs,
        ))
        parts = [activation_layer(activation, name=block + "act")]
        if batchnorm:
            bn = keras.layers.BatchNormalization(name=block + "bn")
            parts.insert(0 if batchnorm == "before" else 1, bn)
        layers.extend(parts)
        if pool:
            layers.append(keras.layers.MaxPooling2D(2, padding="same", name=block + "pool"))
        if dropout:
            layers.append(dropout_layer(dropout, setup.dropout, mc_dropout, name=block + "dropout"))
    return layers


_warned: set[str] = set()


def _warn_if_not_self_normalizing(batchnorm, max_norm, kernel_regularizer) -> None:
    """SELU self-normalizes only with LeCun init, alpha dropout, no BN and no weight penalties."""
    breaks = [
        (batchnorm, "BatchNorm", "batchnorm=None (SELU normalizes itself)"),
        (max_norm, "max-norm", "no constraint, or alpha dropout for regularization"),
        (kernel_regularizer, "a kernel regularizer", "alpha dropout for regularization"),
    ]
    for present, what, instead in breaks:
        if present and what not in _warned:
            _warned.add(what)
            warnings.warn(
                f"SELU with {what} breaks self-normalization; use {instead}.", UserWarning, stacklevel=4
            )
