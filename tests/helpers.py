"""Test helpers every test module reuses: the command line in this process, the digits as images, config and
saving round trips. Imported as `from helpers import ...` (pytest puts `tests/` on the path); fixtures live in
`conftest.py`."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
from click.testing import CliRunner, Result

from transferkit.cli import cli


def run(*args) -> Result:
    """The command line in this process (TensorFlow imported once); stdout and stderr apart."""
    return CliRunner().invoke(cli, [str(a) for a in args], obj={})


def digit_images(n: int = 16) -> np.ndarray:
    """The first `n` digits as `(n, 8, 8, 1)` float32 images, pixels 0..16."""
    from transferkit.data.sources import load_data

    return load_data("digits").x[:n].astype("float32")


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


def photos(root: Path, classes=("a", "b", "c"), per_class: int = 14) -> Path:
    """Colour images of mixed sizes (so they are resized), one level per class plus noise."""
    from PIL import Image

    rng = np.random.default_rng(1)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            size = (10 + i % 3, 12 + i % 4, 3)
            pixels = np.clip(rng.normal(50 + 70 * c, 30, size), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i:02d}.png")
    return root
