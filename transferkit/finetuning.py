"""Fine-tuning: a new head on a saved encoder or a Keras Applications backbone.

Stage 1 trains the head with the base frozen. Stage 2 unfreezes the top
`unfreeze_top` blocks of the base (0: the head alone) and trains at
`lr * finetune_lr_factor`. Each stage compiles anew with a fresh optimizer, and
BatchNorm layers of the base stay frozen, so they run in inference mode (Keras 3
runs a BatchNormalization with `trainable=False` on its moving statistics).

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.finetuning import run_finetune
>>> result = run_finetune(Recipe(from_="saved_models/digits-encoder",
...                              label_fraction=0.05, unfreeze_top=2))  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from transferkit import artifacts, runs
from transferkit.backbones import (
    backbone_input_size, blocks_of, build_backbone, get_backbone, image_adapter,
)
from transferkit.data import Data, Split, load_data, pipeline, split_data
from transferkit.errors import SettingsError
from transferkit.optimizers import optimizer
from transferkit.recipe import Recipe

Blocks = list[tuple[str, list[keras.layers.Layer]]]


def run_finetune(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Build the classifier, train it in two stages, test it, save it."""
    if not recipe.from_ and not recipe.backbone:
        raise SettingsError("finetune needs a base: --from DIR (a saved encoder) or --backbone NAME.")
    encoder_manifest = artifacts.read_manifest(recipe.from_, ("encoder",)) if recipe.from_ else None
    data = load_data(recipe.data, image_size=recipe.image_size)
    runs.require_labels(data)
    split = _split_for(recipe, data, encoder_manifest)
    out = runs.out_dir(recipe, "classifier")
    keras.utils.set_random_seed(recipe.seed)
    optimizer(recipe.optimizer, learning_rate=recipe.lr)  # fail early on a bad name

    model, base, blocks, base_info = build_classifier(recipe, data, encoder_manifest)
    if recipe.unfreeze_top > len(blocks):
        raise SettingsError(
            f"--unfreeze-top {recipe.unfreeze_top} is more than the base has blocks: it has {len(blocks)} "
            f"({', '.join(name for name, _ in blocks)})."
        )
    x, y = data.x[split.labeled], data.y[split.labeled]
    train = pipeline(x, y, recipe.batch_size, shuffle=True, seed=recipe.seed)
    val = pipeline(data.x[split.val], data.y[split.val], recipe.batch_size) if len(split.val) else None
    runs.print_line(f"finetune: {base_info['description']} on {len(x)} labeled examples "
                    f"({recipe.label_fraction:g} of {len(split.train)}), {data.num_classes} classes", verbose)

    stages = [("head", 0, recipe.head_epochs, recipe.lr),
              (f"top{recipe.unfreeze_top}", recipe.unfreeze_top, recipe.epochs, recipe.lr * recipe.finetune_lr_factor)]
    history: dict[str, list[float]] = {}
    epoch = 0
    for name, top, epochs, lr in stages:
        if epochs == 0:
            continue
        unfrozen = freeze_all_but_top(base, blocks, top)
        model.compile(optimizer=optimizer(recipe.optimizer, learning_rate=lr),
                      loss="sparse_categorical_crossentropy", metrics=["accuracy"])
        runs.print_line(f"stage {name}: epochs {epoch + 1}-{epoch + epochs}, learning rate {lr:g}, "
                        f"trainable blocks: {', '.join(unfrozen) or 'none'} + head", verbose)
        fit = model.fit(train, validation_data=val, initial_epoch=epoch, epochs=epoch + epochs,
                        shuffle=False, verbose=2 if verbose else 0)
        runs.merge_history(history, fit)
        epoch += epochs

    test_loss, test_accuracy = model.evaluate(
        pipeline(data.x[split.test], data.y[split.test], recipe.batch_size), verbose=0)
    metrics = {"test_accuracy": float(test_accuracy), "test_loss": float(test_loss)}
    manifest = runs.base_manifest("classifier", recipe, data, split)
    manifest.update(
        num_classes=data.num_classes,
        base=base_info,
        blocks=[name for name, _ in blocks],
        stages=[{"name": n, "unfreeze_top": t, "epochs": e, "lr": lr} for n, t, e, lr in stages],
        metrics=metrics,
    )
    runs.save_run(out, model, recipe, manifest, split, history)
    runs.print_line(f"test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(split.test)} "
                    f"held-out examples; classifier saved to {out}", verbose)
    return runs.Result(model=model, history=history, metrics=metrics, artifact=out, manifest=manifest)


def build_classifier(recipe: Recipe, data: Data, encoder_manifest: dict[str, Any] | None
                     ) -> tuple[keras.Model, keras.Model, Blocks, dict[str, Any]]:
    """inputs → base → pooling → (dropout) → softmax head; returns the model, base, blocks, base info."""
    inputs = keras.Input(data.input_shape, name="inputs")
    if encoder_manifest is not None:
        if tuple(encoder_manifest["input_shape"]) != data.input_shape:
            raise SettingsError(
                f"The data's inputs have shape {data.input_shape}, but the encoder in {recipe.from_!r} "
                f"takes {tuple(encoder_manifest['input_shape'])}."
            )
        base = keras.saving.load_model(Path(recipe.from_) / artifacts.MODEL)
        x = base(inputs)
        blocks = blocks_of(base)
        info = {"from": str(recipe.from_), "kind": "encoder", "description": f"encoder {recipe.from_}"}
    else:
        entry = get_backbone(recipe.backbone)
        if len(data.input_shape) != 3:
            raise SettingsError(f"Backbone {recipe.backbone!r} takes images; the data's inputs have shape "
                                f"{data.input_shape}.")
        side = backbone_input_size(entry, *data.input_shape[:2], recipe.image_size)
        x = image_adapter(inputs, data.value_range, side, entry.preprocess)
        base = build_backbone(recipe.backbone, recipe.weights, (side, side, 3))
        x = base(x)
        blocks = blocks_of(base, entry.blocks)
        info = {"backbone": recipe.backbone, "weights": recipe.weights, "input_side": side,
                "preprocess": entry.preprocess, "kind": "backbone",
                "description": f"{recipe.backbone} (weights {recipe.weights}) at {side}x{side}"}
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(x.shape) > 2:
        x = keras.layers.Flatten(name="flatten")(x)
    if recipe.dropout:
        x = keras.layers.Dropout(recipe.dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(data.num_classes, activation="softmax", dtype="float32", name="head")(x)
    return keras.Model(inputs, outputs, name="classifier"), base, blocks, info


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


def _split_for(recipe: Recipe, data: Data, encoder_manifest: dict[str, Any] | None) -> Split:
    """The split; on the encoder's own data, the encoder's split, so its test examples stay unseen."""
    same_data = encoder_manifest is not None and encoder_manifest["data"]["fingerprint"] == data.fingerprint
    seed = recipe.resolved_split_seed
    if same_data and recipe.split_seed is None:
        seed = int(encoder_manifest["split"]["seed"])
    split = split_data(data, seed=seed, test_fraction=recipe.test_fraction, val_fraction=recipe.val_fraction,
                       label_fraction=recipe.label_fraction, label_seed=recipe.seed)
    if same_data:
        pretrained_on = np.asarray(artifacts.read_json(recipe.from_, artifacts.SPLIT)["train"])
        leaked = np.intersect1d(pretrained_on, split.test)
        if len(leaked):
            raise SettingsError(
                f"split seed {seed} puts {len(leaked)} test examples among the encoder's pretraining inputs; "
                f"use the encoder's split seed {encoder_manifest['split']['seed']} (leave --split-seed unset)."
            )
    return split
