"""Random image augmentation inside the model, in training only; MixUp / CutMix batches; test-time augmentation.

`Augmentation` holds Keras 3's random preprocessing layers (RandomFlip,
RandomRotation, RandomZoom, RandomTranslation, RandomContrast, RandAugment)
and runs them only when called with `training=True` (as `fit` does). Keras's
own layers default to `training=True` when nothing says otherwise, so a plain
`model(x)` would augment and would tell the layers after them that they are
training (PITFALLS 1); `Augmentation` defaults to inference and calls them
with `training=True` explicitly, on the inputs alone.

`mix_batches` applies `keras.layers.MixUp` / `keras.layers.CutMix` to the
batches of a `tf.data` pipeline, with one-hot targets mixed the same way.
`tta_predict` averages the probabilities of the original inputs and
`copies - 1` augmented copies (the model's own `Augmentation`, else horizontal
flips), with dropout off and BatchNorm in inference mode.

Example:

>>> import numpy as np
>>> layer = Augmentation("flip,rotate:10", value_range=(0.0, 16.0), seed=1)
>>> x = np.ones((2, 8, 8, 1), "float32")
>>> bool(np.array_equal(layer(x), x))    # inference by default: the inputs as they are
True
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

from transferkit.pieces.augment_spec import NO_STEPS, describe_augment, parse_augment, random_layer
from transferkit.errors import SettingsError

TTA_SEED = 0  # the default flips of test-time augmentation: the same copies on every run


@keras.saving.register_keras_serializable(package="transferkit")
class Augmentation(keras.layers.Layer):
    """Random image augmentation that runs only in training: the inputs pass unchanged otherwise.

    Example:

    >>> layer = Augmentation("light", value_range=(0.0, 255.0))
    >>> layer.spec
    'rotate:10,zoom:0.1,translate:0.1'

    Args:
        spec: String. The augmentation: `"light"`, `"medium"` or a comma list of
            `flip`, `rotate:DEG`, `zoom:F`, `translate:F`, `contrast:F`,
            `randaugment` (see `transferkit.pieces.augment_spec`). Defaults to `"light"`.
        value_range: Tuple of two floats. The pixels' range (for contrast and
            RandAugment). Defaults to `(0.0, 255.0)`.
        seed: Optional integer. Seed of the random layers. Defaults to `None`.
        **kwargs: Any `keras.layers.Layer` argument (`name`, `dtype`).

    Input: images `(batch, height, width, channels)`; output: the same shape.

    Raises:
        ValueError: an unknown word or a value out of range, an empty spec, or a
            `value_range` whose low end is not below its high end.
    """

    def __init__(self, spec: str = "light", value_range: tuple[float, float] = (0.0, 255.0),
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        try:
            steps = parse_augment(spec)
        except SettingsError as err:
            raise ValueError(str(err)) from None
        if not steps:
            raise ValueError(f"Augmentation needs at least one step. Received: spec={spec!r}")
        low, high = (float(v) for v in value_range)
        if not low < high:
            raise ValueError(f"value_range must be (low, high) with low < high. Received: value_range={value_range}")
        self.spec = describe_augment(steps)
        self.value_range = (low, high)
        self.seed = seed
        self.steps = [random_layer(word, value, self.value_range, None if seed is None else seed + i)
                      for i, (word, value) in enumerate(steps)]

    def build(self, input_shape):
        if len(input_shape) != 4:
            raise ValueError(f"Augmentation takes images (batch, height, width, channels). "
                             f"Received: input_shape={input_shape}")
        for step in self.steps:
            step.build(input_shape)
        self.built = True

    def call(self, inputs, training=None):
        return self.augment(inputs) if training else inputs

    def augment(self, images):
        """`images` through every random layer, in training mode (each call draws anew)."""
        for step in self.steps:
            images = step(images, training=True)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "spec": self.spec, "value_range": list(self.value_range), "seed": self.seed}


def augmentation_for(inputs, spec: str, value_range: tuple[float, float], seed: int | None = None):
    """The `Augmentation` of `spec` for `inputs` (named `augmentation`), or None for `"none"`.

    Raises:
        SettingsError: `inputs` are not images.
        ValueError: an unknown word or a value out of range (as `Augmentation`).
    """
    if spec is None or str(spec).strip().lower() in NO_STEPS:
        return None
    if len(inputs.shape) != 4:
        raise SettingsError(f"--augment needs image inputs (height, width, channels); the data's inputs have "
                            f"shape {tuple(inputs.shape[1:])}. Received: augment={spec!r}")
    return Augmentation(spec, value_range=value_range, seed=seed, name="augmentation")


def find_augmentation(model: keras.Model) -> Augmentation | None:
    """The model's `Augmentation` layer, or None."""
    from transferkit.pieces.freezing import all_layers

    return next((layer for layer in all_layers(model) if isinstance(layer, Augmentation)), None)


@keras.saving.register_keras_serializable(package="transferkit")
class ExactCutMix(keras.layers.CutMix):
    """`keras.layers.CutMix` whose targets mix in the proportion of pixels actually pasted.

    Keras 3.15's CutMix pastes whole pixels (those inside the box) but mixes the
    targets by the box's real-valued area; on small images the two differ a lot
    (on 8x8 digits by up to ~15 points of the target). Here the target weight of
    each image is the fraction of its pixels it keeps, as timm's `correct_lam`.

    Example:

    >>> import numpy as np
    >>> layer = ExactCutMix(factor=1.0, seed=0)
    >>> out = layer({"images": np.zeros((4, 8, 8, 1), "float32"), "labels": np.eye(4, dtype="float32")})
    >>> out["labels"].shape
    TensorShape([4, 4])

    Args:
        factor: Float in [0, 1] (or two). The Beta concentration of the box's area is drawn in
            `[0, factor]`. Defaults to `1.0`.
        seed: Optional integer. Defaults to `None`.
        **kwargs: Any `keras.layers.CutMix` argument.
    """

    def get_random_transformation(self, data, training=True, seed=None):
        transformation = super().get_random_transformation(data, training=training, seed=seed)
        if transformation is None:
            return None
        pasted = self.backend.cast(transformation["batch_masks"], self.compute_dtype)
        transformation["mix_weight"] = 1.0 - self.backend.numpy.mean(pasted, axis=(1, 2, 3))
        return transformation


def mix_batches(dataset, mixup: float = 0.0, cutmix: float = 0.0, seed: int = 0):
    """`dataset` of `(images, one-hot targets)` batches with MixUp and/or CutMix applied to each batch.

    With both, each batch gets one of them, chosen at random with equal odds
    (timm's switch). MixUp draws each example's weight from Beta(alpha, alpha);
    CutMix (`ExactCutMix(factor=cutmix)`, Keras's with exact target weights)
    pastes a box whose area comes from Beta(a, a), `a` drawn in [0, cutmix]; the
    targets are mixed in the proportions of the pixels each image keeps.

    Args:
        dataset: A batched `tf.data.Dataset` of `(images, targets)`; targets are float probabilities.
        mixup: Float >= 0. MixUp's alpha (0: off). Defaults to `0.0`.
        cutmix: Float in [0, 1]. CutMix's factor (0: off). Defaults to `0.0`.
        seed: Integer. Seed of the layers and of the choice. Defaults to `0`.

    Returns:
        The mapped `tf.data.Dataset`.
    """
    import tensorflow as tf

    mixers = []
    if mixup:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed))
    if cutmix:
        mixers.append(ExactCutMix(factor=cutmix, seed=seed + 1))
    if not mixers:
        return dataset

    def apply(layer, x, y):
        mixed = layer({"images": x, "labels": tf.cast(y, "float32")}, training=True)
        return tf.cast(mixed["images"], x.dtype), tf.cast(mixed["labels"], "float32")

    def mix(x, y):
        if len(mixers) == 1:
            return apply(mixers[0], x, y)
        first = tf.random.uniform((), seed=seed) < 0.5
        return tf.cond(first, lambda: apply(mixers[0], x, y), lambda: apply(mixers[1], x, y))

    return dataset.map(mix, num_parallel_calls=1, deterministic=True)


def tta_predict(model: keras.Model, x, copies: int, batch_size: int = 256) -> np.ndarray:
    """Mean class probabilities over `x` and `copies - 1` augmented copies of it, batch by batch.

    The copies come from the model's own `Augmentation` (its layers in training
    mode, on the inputs alone), else from random horizontal flips. The model
    itself runs in inference mode: no dropout (MC dropout included), BatchNorm
    on its moving statistics.

    Example:

    >>> probabilities = tta_predict(model, images, copies=4)                       # doctest: +SKIP
    >>> probabilities = tta_predict(model, (b for b in stream_of_batches), copies=4)  # doctest: +SKIP

    Args:
        model: A Keras classifier taking images.
        x: An array of images, cut into batches of `batch_size`, or any iterable of
            image batches (a generator, a `tf.data.Dataset` of inputs), taken as they come.
        copies: Integer >= 1. Predictions averaged per example, the original's included.
        batch_size: Integer. Examples per batch of an array. Defaults to `256`.

    Returns:
        `(examples, classes)` mean probabilities.

    Raises:
        SettingsError: `copies` < 1, or a model that does not take images.
    """
    from transferkit.pieces.uncertainty import deterministic_model

    augmentation = tta_augmentation(model, copies)
    served = deterministic_model(model)
    batches = x
    if isinstance(x, np.ndarray) or keras.ops.is_tensor(x):
        batches = (x[start:start + batch_size] for start in range(0, len(x), batch_size))
    return np.concatenate([tta_batch(served, batch, copies, augmentation) for batch in batches]
                          or [np.zeros((0, model.outputs[0].shape[-1]), "float32")])


def tta_augmentation(model: keras.Model, copies: int) -> Augmentation:
    """What makes the copies: the model's own `Augmentation`, else seeded horizontal flips."""
    if copies < 1:
        raise SettingsError(f"--tta must be at least 1 (the original alone). Received: tta={copies}")
    if len(model.inputs[0].shape) != 4:
        raise SettingsError(f"--tta needs a model that takes images; this one takes inputs of shape "
                            f"{tuple(model.inputs[0].shape[1:])}.")
    return find_augmentation(model) or Augmentation("flip", seed=TTA_SEED, name="tta_flip")


def tta_batch(served: keras.Model, batch: Any, copies: int, augmentation: Augmentation) -> np.ndarray:
    """One batch's mean probabilities over the original and `copies - 1` augmented copies.

    `served` runs with `training=False`: pass `uncertainty.deterministic_model(model)` for a model with MC dropout.
    """
    total = keras.ops.convert_to_numpy(served(batch, training=False)).astype("float64")
    for _ in range(copies - 1):
        total += keras.ops.convert_to_numpy(served(augmentation.augment(batch), training=False))
    return (total / copies).astype("float32")
