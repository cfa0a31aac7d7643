"""Auxiliary tasks with free labels: image rotation, and "same or different" pairs.

`rotation` (Gidaris et al., 2018): every training image is shown at 0, 90, 180
and 270 degrees and the encoder, with a 4-way softmax on top, learns which. The
turns are made batch by batch in the input pipeline (`rotated`): an image folder
streams, each image decoded when its batch is built.

`pairs` (the chapter's "same or different" task): a siamese encoder sees two
randomly augmented views of each image in a batch; every pair of views, one
from each side, is labelled same (both views of one image) or different, and
the encoder learns to tell them apart from the cosine similarity of its
(projected) outputs. Each batch of `B` images thus gives `B` same and
`B*(B-1)` different pairs; the loss weighs the two kinds equally. The views
are drawn by the model's random layers on each batch the pipeline streams in.

Example:

>>> import numpy as np
>>> from transferkit.pretraining.pretext import rotations
>>> x, k = rotations(np.arange(4.0).reshape(1, 2, 2, 1))
>>> k.tolist(), x[1, ..., 0].tolist()
([0, 1, 2, 3], [[1.0, 3.0], [0.0, 2.0]])
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np
from keras import ops

from transferkit.pieces.pretext_layers import PairScores
from transferkit.pretraining.job import Examples, Job, Pretrained, final_metrics, fit_task
from transferkit.pretraining.encoder import corruption, pooled

ANGLES = (0, 90, 180, 270)


def rotations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every image of `x` `(N, H, W, C)` turned by 0, 90, 180 and 270 degrees counter-clockwise.

    Returns `(images, labels)`: `4N` images, image `i` turned by `labels[i] * 90`
    degrees, the four turns of each image next to each other.

    Example:

    >>> images, labels = rotations(np.zeros((3, 8, 8, 1)))
    >>> images.shape, labels[:5].tolist()
    ((12, 8, 8, 1), [0, 1, 2, 3, 0])
    """
    x = np.asarray(x)
    if x.ndim != 4 or x.shape[1] != x.shape[2]:
        raise ValueError(f"rotations takes square images (N, H, W, C). Received: shape={x.shape}")
    turned = np.stack([np.rot90(x, k, axes=(1, 2)) for k in range(4)], axis=1)
    return turned.reshape(-1, *x.shape[1:]), np.tile(np.arange(4), len(x))


def rotated(x: Any) -> Examples:
    """The examples of `rotations(x)`, built batch by batch in the pipeline: `x` (arrays or image files) is never
    turned, nor decoded, whole.

    Example `4 i + k` is input `i` turned by `k` quarter turns, labelled `k`,
    as in `rotations`; a batch gathers (decodes) its inputs and turns each.

    Example:

    >>> x = np.arange(8.0).reshape(2, 2, 2, 1)
    >>> images, labels = next(iter(rotated(x).in_order(8)))
    >>> bool((images.numpy() == rotations(x)[0]).all()), labels.numpy().tolist()
    (True, [0, 1, 2, 3, 0, 1, 2, 3])
    """
    import tensorflow as tf

    inputs = Examples.of(x)

    def make(indices):
        turns = indices % len(ANGLES)
        images = inputs.make(indices // len(ANGLES))
        every_turn = tf.stack([tf.image.rot90(images, k) for k in range(len(ANGLES))], axis=1)
        return tf.gather(every_turn, turns, batch_dims=1), turns

    return Examples(len(ANGLES) * len(x), make)


def train_rotation(job: Job) -> Pretrained:
    """`rotation`: a 4-way softmax on the encoder learns each image's rotation (the turns made in the pipeline)."""
    inputs = keras.Input(job.data.input_shape, name="inputs")
    outputs = keras.layers.Dense(4, activation="softmax", name="rotation")(pooled(job.encoder(inputs)))
    model = keras.Model(inputs, outputs, name="rotation_classifier")
    history = fit_task(job, model, rotated(job.x_train), None, "sparse_categorical_crossentropy",
                       validation=rotated(job.x_val), metrics=["accuracy"])
    sample, turns = rotations(job.sample(4))
    predicted = np.argmax(model.predict(sample, verbose=0), axis=1).reshape(-1, 4)
    titles = [[f"{ANGLES[p]}°{'' if p == k else ' (wrong)'}" for k, p in enumerate(row)] for row in predicted]
    from transferkit.store.pictures import image_grid

    figure = image_grid([(f"input {i + 1}", sample[4 * i:4 * i + 4]) for i in range(len(predicted))],
                        value_range=job.data.value_range, titles=titles,
                        title="rotation: the predicted angle of each turned input")
    return Pretrained(history, final_metrics(history, ("loss", "val_loss", "accuracy", "val_accuracy"), at=job.kept),
                      {"predictions.png": figure})


def same_pairs(ids_a, ids_b=None):
    """1.0 where view `i` of one side and view `j` of the other come from the same image, else 0.0.

    `ids_a`, `ids_b`: the source image of each view (`ids_b` defaults to `ids_a`).

    Example:

    >>> np.asarray(same_pairs(np.array([3, 5, 3]))).tolist()
    [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]
    """
    ids_a = ops.reshape(ids_a, (-1,))
    ids_b = ids_a if ids_b is None else ops.reshape(ids_b, (-1,))
    return ops.cast(ops.equal(ops.expand_dims(ids_a, 1), ops.expand_dims(ids_b, 0)), "float32")


def same_or_different_loss(ids, logits):
    """Binary cross-entropy of every pair of views being "same", same and different pairs weighted equally.

    `ids`: `(B,)` source image of each of the `B` images in the batch (both sides
    show the same images in the same order); `logits`: `(B, B)` scores of view
    `i` of side one and view `j` of side two coming from one image.
    """
    labels = same_pairs(ids)
    losses = ops.binary_crossentropy(labels, logits, from_logits=True)
    same = ops.sum(losses * labels) / ops.maximum(ops.sum(labels), 1.0)
    different = ops.sum(losses * (1 - labels)) / ops.maximum(ops.sum(1 - labels), 1.0)
    return (same + different) / 2


def pair_accuracy(ids, logits):
    """The fraction of views whose best-scoring partner on the other side is a view of their own image."""
    labels = same_pairs(ids)
    best = ops.argmax(logits, axis=1)
    return ops.mean(ops.take_along_axis(labels, ops.expand_dims(best, 1), axis=1))


# how far `pairs` views of an image differ: shift (fraction of the side), turn (degrees), zoom, noise (x std)
VIEWS = {"shift": 0.125, "turn": 15.0, "zoom": 0.1, "jitter": 0.1, "mask": 0.1}


def augmentation(job: Job, views: dict[str, float] | None = None) -> list[keras.layers.Layer]:
    """Random views of raw inputs: small shifts, turns and zooms of images; noise and masking of vectors."""
    views = {**VIEWS, **(views or {})}
    seed = job.recipe.seed
    if len(job.data.input_shape) == 3:
        kw = dict(fill_mode="constant", fill_value=float(job.data.value_range[0]), interpolation="bilinear")
        layers = [keras.layers.RandomTranslation(views["shift"], views["shift"], seed=seed, name="shift", **kw)]
        if views["turn"]:
            layers.append(keras.layers.RandomRotation(views["turn"] / 360, seed=seed + 1, name="turn", **kw))
        if views["zoom"]:
            layers.append(keras.layers.RandomZoom(views["zoom"], seed=seed + 2, name="zoom", **kw))
        return layers + corruption(views["jitter"], "gaussian", job.data_std, name="jitter", seed=seed + 3)
    return [*corruption(2 * views["jitter"], "gaussian", job.data_std, name="jitter", seed=seed),
            *corruption(views["mask"], "dropout", name="mask", seed=seed + 1)]


def build_pairs_model(job: Job, projection: int = 64) -> keras.Model:
    """images `(B, ...)` → two augmented views → one embedder (encoder, pooling, projection) → `(B, B)` logits."""
    features_in = keras.Input(job.data.input_shape, name="view")
    embedded = keras.layers.Dense(projection, name="projection")(pooled(job.encoder(features_in)))
    embedder = keras.Model(features_in, embedded, name="embedder")
    inputs = keras.Input(job.data.input_shape, name="inputs")
    augment = augmentation(job)
    views = []
    for _ in range(2):
        x = inputs
        for layer in augment:  # on in validation too: without it both views are equal and "same" is trivial
            x = layer(x, training=True)
        views.append(embedder(x))
    return keras.Model(inputs, PairScores(name="pair_scores")(views), name="siamese")


def train_pairs(job: Job) -> Pretrained:
    """`pairs`: the siamese encoder learns which pairs of augmented views come from the same image."""
    model = build_pairs_model(job)
    ids = np.arange(len(job.data.x), dtype="float32")
    history = fit_task(job, model, job.x_train, ids[job.split.train], same_or_different_loss,
                       validation=(job.x_val, ids[job.split.val]) if len(job.x_val) else None,
                       metrics=[pair_accuracy])
    return Pretrained(history, final_metrics(history, ("loss", "val_loss", "pair_accuracy", "val_pair_accuracy"),
                                              at=job.kept),
                      {"pairs.png": _pairs_picture(job, model)})


def _pairs_picture(job: Job, model: keras.Model):
    """Two views of each of 8 images, and each view's probability of "same" with its partner and a stranger."""
    from transferkit.store.pictures import image_grid

    sample = job.sample(8)
    augment = keras.Sequential(augmentation(job))
    a, b = (keras.ops.convert_to_numpy(augment(sample, training=True)) for _ in range(2))
    embedder, scores = model.get_layer("embedder"), model.get_layer("pair_scores")
    p = keras.ops.convert_to_numpy(ops.sigmoid(scores([embedder(a, training=False), embedder(b, training=False)])))
    stranger = np.roll(np.arange(len(sample)), 1)
    titles = [[""] * len(sample), [f"same {p[i, i]:.2f}" for i in range(len(sample))],
              [f"same {p[i, j]:.2f}" for i, j in enumerate(stranger)]]
    return image_grid([("view 1", a), ("view 2", b), ("another's", b[stranger])], value_range=job.data.value_range,
                      titles=titles, title="pairs: P(same image) of view 1 with each view below it")
