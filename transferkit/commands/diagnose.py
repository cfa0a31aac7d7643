"""`transferkit.diagnose`: the health probe of a model given as a Keras model, an artifact folder or a `.keras` file.

The probe itself is a piece (`transferkit.pieces.probes.diagnose`, which takes a
Keras model and arrays or a Dataset); this command loads what a path names,
picks an artifact's training split (never its test split) and reads data specs.

Example:

>>> import transferkit as tk
>>> report = tk.diagnose("saved_models/digits-classifier")         # doctest: +SKIP
>>> print(report.format())                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras

from transferkit.errors import SettingsError, TransferkitError
from transferkit.pieces import probes
from transferkit.pieces.health_report import DiagnosisReport, Thresholds
from transferkit.store import artifacts
from transferkit.store.manifest import Manifest


def diagnose(
    model: keras.Model | str | Path,
    data: Any = None,
    batches: int = 4,
    *,
    batch_size: int = 32,
    loss: str | Callable | None = "auto",
    training: bool = True,
    seed: int = 0,
    thresholds: Thresholds | None = None,
) -> DiagnosisReport:
    """Per-layer activation and gradient figures of `model` on a few batches, with verdicts.

    Example:

    >>> report = diagnose("saved_models/digits-classifier")            # doctest: +SKIP
    >>> report.healthy, [v.kind for v in report.verdicts]               # doctest: +SKIP
    (True, [])

    Args:
        model: A Keras model, a transferkit artifact folder, or a `.keras` file.
        data: `(x, y)` arrays (`y` may be `None`), an array of inputs, a batched
            `tf.data.Dataset` of `(x, y)` or `x`, or a data spec string. For an
            artifact it defaults to the training split of the artifact's data;
            a `.keras` file needs it. Arrays are sampled with `seed`.
        batches, batch_size, loss, training, seed, thresholds: As for the piece
            `transferkit.pieces.probes.diagnose`, which this runs.

    Returns:
        A `DiagnosisReport`.

    Raises:
        SettingsError: a model path that is neither an artifact nor a `.keras`
            file, data that does not fit the model, `batches` < 1.
    """
    probes.check_count("batches", batches)
    probes.check_count("batch_size", batch_size)
    model, data, source, encoder = _resolve(model, data)
    if isinstance(data, str):
        from transferkit.data.sources import load_data

        loaded = load_data(data)
        data = (loaded.x, loaded.y)
    return probes.diagnose(model, data, batches, batch_size=batch_size, loss=loss, training=training, seed=seed,
                           thresholds=thresholds, labels=not encoder, source=source)


def _resolve(model, data) -> tuple[keras.Model, Any, str, bool]:
    """The model, its data, a description of the data, and whether labels are to be ignored."""
    if isinstance(model, keras.Model):
        return model, data, "given data" if not isinstance(data, str) else data, False
    import transferkit.pieces.schedules  # noqa: F401  registers OneCycle, which compiled artifacts' optimizers name

    path = Path(model)
    if path.is_dir():
        manifest = artifacts.read_manifest(path)
        loaded_model = artifacts.load_model(path)
        encoder = manifest.kind == "encoder"
        if data is None or isinstance(data, str):
            data, source = _artifact_data(path, manifest, data)
        else:
            source = "given data"
        return loaded_model, data, source, encoder
    if path.is_file() and path.suffix == ".keras":
        if data is None:
            raise SettingsError(f"Model {str(path)!r} is a .keras file; pass the data to diagnose it on (--data SPEC).")
        try:
            loaded_model = keras.saving.load_model(path)
        except Exception as err:  # a truncated zip, a bad config, an unregistered class
            raise TransferkitError(f"{str(path)!r} could not be loaded: {type(err).__name__}: "
                                   f"{str(err).splitlines()[0] if str(err) else ''}") from None
        return loaded_model, data, data if isinstance(data, str) else "given data", False
    raise SettingsError(f"Model {str(path)!r} is neither a transferkit artifact folder nor a .keras file.")


def _artifact_data(path: Path, manifest: Manifest, spec: str | None) -> tuple[tuple, str]:
    """The artifact's training split (never its test split); all of other data."""
    from transferkit.training import runs

    spec = spec or manifest.data.spec
    loaded, split = runs.artifact_data(path, manifest, spec)
    if split is not None:
        return (loaded.x[split.train], None if loaded.y is None else loaded.y[split.train]), f"training split of {spec}"
    return (loaded.x, loaded.y), f"all of {spec}"
