"""Per-block learning rates (discriminative fine-tuning) for any Keras optimizer.

Keras 3 has no parameter groups (keras issue 21741). Every Keras optimizer's
update of a variable is `learning_rate` times a direction that does not depend
on the learning rate (SGD with momentum keeps `lr * g` in its velocity, so a
constant factor per variable scales it exactly too), so giving a variable its
own factor in `update_step` is exactly what a separate optimizer with that
rate would do, for Adam, Nadam and RMSprop as well as SGD. (AdamW's decoupled
weight decay is applied outside `update_step` and is not scaled.)

Example:

>>> import keras
>>> from transferkit.pieces.discriminative import with_learning_rate_factors
>>> opt = with_learning_rate_factors(keras.optimizers.Nadam(1e-3), {"dense/kernel": 0.5})
>>> type(opt).__name__
'DiscriminativeNadam'
"""

from __future__ import annotations

import keras


class _LearningRateFactors:
    """Mixin: multiply each variable's learning rate by `lr_factors[variable.path]` (default 1)."""

    def __init__(self, *args, lr_factors: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_factors = {str(k): float(v) for k, v in (lr_factors or {}).items()}
        if any(v < 0 for v in self.lr_factors.values()):
            raise ValueError(f"lr_factors must be >= 0. Received: lr_factors={self.lr_factors}")

    def build(self, var_list):
        super().build(var_list)
        self._factors = [self.lr_factors.get(v.path, 1.0) for v in var_list]

    def update_step(self, gradient, variable, learning_rate):
        factor = self._factors[self._get_variable_index(variable)]
        if factor != 1.0:
            learning_rate = keras.ops.multiply(keras.ops.cast(learning_rate, variable.dtype), factor)
        return super().update_step(gradient, variable, learning_rate)

    def get_config(self):
        return {**super().get_config(), "lr_factors": dict(self.lr_factors)}


def _discriminative(base: type) -> type:
    cls = type(f"Discriminative{base.__name__}", (_LearningRateFactors, base),
               {"__doc__": f"`keras.optimizers.{base.__name__}` with a learning-rate factor per variable."})
    return keras.saving.register_keras_serializable(package="transferkit")(cls)


_CLASSES = {base: _discriminative(base) for base in (
    keras.optimizers.SGD, keras.optimizers.Adam, keras.optimizers.AdamW, keras.optimizers.Nadam,
    keras.optimizers.RMSprop, keras.optimizers.Adamax, keras.optimizers.Adagrad, keras.optimizers.Lion,
)}


def with_learning_rate_factors(optimizer: keras.optimizers.Optimizer,
                               lr_factors: dict[str, float]) -> keras.optimizers.Optimizer:
    """A copy of `optimizer` (not yet built) in which variable `path` learns at `lr * lr_factors[path]`."""
    base = type(optimizer)
    if base in _CLASSES.values():
        base = base.__mro__[2]
    if base not in _CLASSES:
        raise ValueError(f"Per-block learning rates support {', '.join(c.__name__ for c in _CLASSES)}. "
                         f"Received: optimizer={base.__name__}")
    config = {k: v for k, v in optimizer.get_config().items() if k != "lr_factors"}
    return _CLASSES[base].from_config({**config, "lr_factors": lr_factors})


def block_factors(unfrozen_blocks: list[tuple[str, list]], lr_decay: float) -> dict[str, dict]:
    """Factors per variable path: the top block 1, each block below it `1 / lr_decay` of the one above.

    Returns `{block_name: {"factor": f, "paths": [...]}}` for the unfrozen blocks, bottom to top.
    """
    if lr_decay < 1:
        raise ValueError(f"lr_decay must be >= 1 (2.6 is ULMFiT's). Received: lr_decay={lr_decay}")
    out = {}
    for depth, (name, layers) in enumerate(reversed(unfrozen_blocks)):
        factor = lr_decay ** -depth
        out[name] = {"factor": factor, "paths": [w.path for layer in layers for w in layer.trainable_weights]}
    return dict(reversed(list(out.items())))
