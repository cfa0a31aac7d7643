"""transferkit: transfer learning for Keras 3.

Pretrain an encoder on unlabeled data, fine-tune it (or a Keras Applications
backbone) on a few labels, and export a SavedModel for serving.

Example:

>>> import transferkit as tk
>>> enc = tk.pretrain(data="digits", epochs=1)            # doctest: +SKIP
>>> clf = tk.finetune(from_=enc.artifact, label_fraction=0.05,
...                   unfreeze_top=2)                      # doctest: +SKIP
>>> tk.export(clf.artifact)                                # doctest: +SKIP

Names are imported lazily, so `import transferkit` (and `transferkit --help`)
does not import TensorFlow until a name that needs it is used. The Keras
classes (layers, schedules, optimizers) are registered as soon as Keras is
imported, before or after `import transferkit`, so `keras.models.load_model`
loads a model that uses them.
"""

from __future__ import annotations

import importlib
from typing import Any

from transferkit.registration import register_with_keras as _register_with_keras

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "Recipe": "recipe",
    "SettingsError": "errors",
    "TransferkitError": "errors",
    "pretrain": "api",
    "finetune": "api",
    "export": "api",
    "evaluate": "api",
    "predict": "api",
    "find_lr": "api",
    "plot_schedule": "api",
    "mc_predict": "pieces.uncertainty",
    "MCPrediction": "pieces.uncertainty",
    "calibration": "pieces.uncertainty",
    "load_data": "data.sources",
    "setup_for": "pieces.setups",
    "ACTIVATION_SETUPS": "pieces.setups",
    "dense_stack": "pieces.setups",
    "conv_stack": "pieces.setups",
    "MCDropout": "pieces.layers",
    "MCAlphaDropout": "pieces.layers",
    "RReLU": "pieces.layers",
    "optimizer": "pieces.optimizers",
    "OneCycle": "pieces.schedules",
    "OneCycleMomentum": "pieces.momentum",
    "lr_find": "pieces.lr_finder",
    "BACKBONES": "pieces.backbones",
    "load_model": "store.artifacts",
    "diagnose": "api",
    "DiagnosisReport": "pieces.health_report",
    "Thresholds": "pieces.health_report",
    "TrainingHealth": "pieces.health",
    "inspect": "api",
    "audit": "pieces.freezing",
    "with_learning_rate_factors": "pieces.discriminative",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transferkit' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"transferkit.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__


_register_with_keras()
