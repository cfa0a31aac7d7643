"""Test helpers every component reuses: config and saving round trips."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np


def assert_config_round_trip(obj) -> None:
    """config -> from_config -> config gives the same config, and the class is registered."""
    config = obj.get_config()
    rebuilt = type(obj).from_config(config)
    assert rebuilt.get_config() == config
    serialized = keras.saving.serialize_keras_object(obj)
    assert keras.saving.deserialize_keras_object(serialized).get_config() == config


def assert_reloads_with_same_outputs(model: keras.Model, x, tmp_path: Path, atol: float = 1e-6) -> keras.Model:
    """Save `model` as .keras, reload it without custom_objects, compare inference outputs."""
    path = Path(tmp_path) / "model.keras"
    model.save(path)
    reloaded = keras.saving.load_model(path)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(x, training=False)),
        keras.ops.convert_to_numpy(model(x, training=False)),
        atol=atol,
    )
    return reloaded
