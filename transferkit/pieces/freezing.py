"""Freezing a base block by block, and the freeze audit that shows what will train.

Keras 3 runs a `BatchNormalization` whose `trainable` is False on its moving
statistics (inference mode), whatever `training` says; so keeping BatchNorm
frozen is what keeps it in inference mode, in frozen and unfrozen blocks alike.

Example:

>>> import transferkit as tk
>>> tk.inspect("saved_models/digits-classifier")               # doctest: +SKIP
block    trainable  batchnorm  trainable params  frozen params  lr x
block1   no         -          0                 8,320          -
...
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import keras
import numpy as np

from transferkit.pieces.backbones import ENCODER_BLOCK, backbone_named, blocks_of

Blocks = list[tuple[str, list[keras.layers.Layer]]]


def freeze_all_but_top(base: keras.Model, blocks: Blocks, top: int, train_batchnorm: bool = False) -> list[str]:
    """Freeze the base except its top `top` blocks; BatchNorm stays frozen unless `train_batchnorm`.

    Returns the names of the unfrozen blocks.
    """
    unfrozen = blocks[len(blocks) - top:] if top else []
    trainable = {id(layer) for _, layers in unfrozen for layer in layers
                 if train_batchnorm or not isinstance(layer, keras.layers.BatchNormalization)}
    base.trainable = bool(trainable)
    for layer in base.layers:
        layer.trainable = id(layer) in trainable
    return [name for name, _ in unfrozen]


def all_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    """Every layer of `model`, descending into nested models (which are yielded too)."""
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from all_layers(layer)


def find_base(model: keras.Model) -> keras.Model:
    """The nested model inside a transferkit classifier (the encoder or the backbone)."""
    bases = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(bases) != 1:
        raise ValueError(f"Expected a classifier with one nested base model; {model.name!r} has {len(bases)}.")
    return bases[0]


def block_patterns(base: keras.Model) -> tuple[str, ...]:
    """The block expressions for `base`: a registry entry's by model name, else a transferkit encoder's."""
    entry = backbone_named(base.name)
    return entry.blocks if entry is not None else (ENCODER_BLOCK,)


@dataclasses.dataclass(frozen=True)
class BlockAudit:
    """One row of the freeze audit."""

    block: str
    trainable: bool
    batchnorm: str
    trainable_params: int
    frozen_params: int
    lr_factor: float | None


def audit(model: keras.Model, lr_factors: dict[str, float] | None = None,
          blocks: Blocks | None = None) -> list[BlockAudit]:
    """Per block of the base, bottom to top, then the head: what trains, BatchNorm's mode, parameters, lr factor.

    `lr_factors` (variable path → factor) default to those of the model's optimizer, if it has any; `blocks`
    to the base's by its name (a Keras Applications backbone's, else a transferkit encoder's).
    """
    base = find_base(model)
    factors = lr_factors if lr_factors is not None else getattr(getattr(model, "optimizer", None), "lr_factors", {})
    blocks = blocks if blocks is not None else blocks_of(base, block_patterns(base))
    rows = [_row(name, layers, factors) for name, layers in blocks]
    head = [layer for layer in model.layers if layer is not base and layer.weights]
    rows.append(_row("head", head, factors))
    return rows


def _row(name: str, layers: list[keras.layers.Layer], factors: dict[str, float]) -> BlockAudit:
    batchnorms = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    modes = {"training" if layer.trainable else "inference" for layer in batchnorms}
    trainable = [w for layer in layers for w in layer.trainable_weights]
    frozen = [w for layer in layers for w in layer.non_trainable_weights]
    lr = [factors.get(w.path, 1.0) for w in trainable]
    return BlockAudit(
        block=name,
        trainable=bool(trainable),
        batchnorm="/".join(sorted(modes)) or "-",
        trainable_params=sum(int(np.prod(w.shape)) for w in trainable),
        frozen_params=sum(int(np.prod(w.shape)) for w in frozen),
        lr_factor=max(lr) if lr else None,
    )


def format_audit(rows: list[BlockAudit]) -> str:
    """The audit as an aligned table."""
    header = ("block", "trainable", "batchnorm", "trainable params", "frozen params", "lr x")
    lines = [header] + [(
        r.block, "yes" if r.trainable else "no", r.batchnorm, f"{r.trainable_params:,}", f"{r.frozen_params:,}",
        "-" if r.lr_factor is None else f"{r.lr_factor:.3g}") for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in lines)


def inspect(model: keras.Model | str | Path, verbose: bool = True) -> list[BlockAudit]:
    """Print and return the freeze audit of a classifier, or of the artifact folder holding one.

    Example:

    >>> rows = inspect("saved_models/digits-classifier", verbose=False)   # doctest: +SKIP
    >>> rows[-1].block
    'head'
    """
    blocks = None
    if not isinstance(model, keras.Model):
        from transferkit.store import artifacts

        manifest = artifacts.read_manifest(model, ("classifier",))
        model = artifacts.load_model(model)
        if manifest.get("base", {}).get("kind") == "file":  # fine-tuned from --base FILE: its block rule
            from transferkit.finetuning.bases import base_blocks

            blocks = base_blocks(find_base(model))[1]
    rows = audit(model, blocks=blocks)
    if verbose:
        print(format_audit(rows), flush=True)
    return rows
