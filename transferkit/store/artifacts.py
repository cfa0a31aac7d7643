"""Artifact folders: model, recipe, manifest and split, written atomically.

An artifact is a folder such as `saved_models/digits-encoder/` holding
`model.keras`, `recipe.toml`, `manifest.json` and `split.json`. It is built in
a temporary sibling folder and renamed into place, so a crash never leaves a
half-written artifact, and an existing one is replaced only by a complete one.

Example:

>>> from transferkit.store.artifacts import read_manifest
>>> read_manifest("saved_models/digits-encoder")["kind"]      # doctest: +SKIP
'encoder'
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferkit.errors import SettingsError, TransferkitError

MANIFEST = "manifest.json"
MODEL = "model.keras"
RECIPE = "recipe.toml"
SPLIT = "split.json"
FORMAT = 1


@contextlib.contextmanager
def atomic_dir(target: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `target`; on success it replaces `target` in one rename."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        _flush(tmp)
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
            os.replace(target, old / target.name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _flush(folder: Path) -> None:
    """fsync every file under `folder`, then the folder, so a rename never publishes unwritten data."""
    for path in sorted(folder.rglob("*"), reverse=True):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_model(path: str | Path):
    """A transferkit model: an artifact folder's `model.keras`, or a `.keras` file, in Keras's safe mode.

    Example:

    >>> model = load_model("saved_models/digits-classifier")     # doctest: +SKIP

    Raises:
        TransferkitError: the file is damaged (the message names it).
    """
    import keras

    from transferkit.registration import register_keras_objects

    register_keras_objects()
    file = Path(path) if str(path).endswith(".keras") else Path(path) / MODEL
    try:
        return keras.saving.load_model(file, safe_mode=True)
    except Exception as err:  # a truncated zip, a missing entry, a bad config
        raise TransferkitError(
            f"{str(file)!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "the artifact is damaged: write it again."
        ) from None


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary sibling file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=_jsonable))
    os.replace(tmp, path)


def read_manifest(path: str | Path, kinds: tuple[str, ...] = ("encoder", "classifier")) -> dict[str, Any]:
    """The manifest of the artifact at `path`, checking it is one of `kinds`."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise SettingsError(f"Artifact {str(path)!r} does not exist; expected a folder written by transferkit.")
    if not manifest_path.is_file() or not (path / MODEL).is_file():
        raise SettingsError(
            f"{str(path)!r} is not a transferkit artifact; expected a folder with {MANIFEST} and {MODEL}."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise TransferkitError(f"{str(manifest_path)!r} is not valid JSON; the artifact is damaged.") from None
    if manifest.get("kind") not in kinds:
        raise SettingsError(
            f"{str(path)!r} holds a {manifest.get('kind')!r}; expected a {' or '.join(kinds)} artifact."
        )
    return manifest


def read_json(path: str | Path, name: str) -> Any:
    return json.loads((Path(path) / name).read_text())


def versions() -> dict[str, str]:
    """Library versions recorded in every manifest, and the Keras backend the artifact was made on."""
    import keras
    import numpy
    import tensorflow

    from transferkit import __version__

    return {
        "python": platform.python_version(),
        "transferkit": __version__,
        "tensorflow": tensorflow.__version__,
        "keras": keras.__version__,
        "backend": keras.backend.backend(),
        "numpy": numpy.__version__,
    }


def default_out(name: str) -> Path:
    return Path("saved_models") / name


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")
