"""Artifact folders: model, recipe, manifest and split, written atomically.

An artifact is a folder such as `saved_models/digits-encoder/` holding
`model.keras`, `recipe.toml`, `manifest.json` and `split.json`. It is built in
a temporary sibling folder and renamed into place, so a crash never leaves a
half-written artifact, and an existing one is replaced only by a complete one.

Example:

>>> from transferkit.store.artifacts import read_manifest
>>> read_manifest("saved_models/digits-encoder").kind      # doctest: +SKIP
'encoder'
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import platform
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from transferkit.errors import SettingsError, TransferkitError
from transferkit.store.manifest import Manifest

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
    return load_artifact(path)[1]


def load_artifact(path: str | Path, kinds: tuple[str, ...] | None = None) -> tuple[Manifest | None, Any]:
    """The manifest and model of the artifact folder (or `.keras` file) at `path`, the manifest read once.

    With `kinds` the manifest is checked as `read_manifest` checks it, before the model is loaded; without,
    it is None when the folder holds none (a bare `.keras` file) or a damaged one.

    Raises:
        SettingsError: with `kinds`, as `read_manifest`; a package the manifest requires is missing.
        TransferkitError: the file is damaged (the message names it); with `kinds`, as `read_manifest`.
    """
    import keras

    from transferkit.registration import register_keras_objects

    register_keras_objects()
    file = Path(path) if str(path).endswith(".keras") else Path(path) / MODEL
    manifest = read_manifest(file.parent, kinds) if kinds else _manifest_or_none(file.parent)
    base = manifest.base if manifest is not None else None
    import_requirements(base.requires if base is not None else [], file.parent)
    hub = base is not None and base.kind == "hub"
    try:
        with warnings.catch_warnings():
            if hub:  # loaded all trainable (see hub.restore_freeze): more optimizer slots
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
            model = keras.saving.load_model(file, safe_mode=True)
    except Exception as err:  # a truncated zip, a missing entry, a bad config
        raise TransferkitError(
            f"{str(file)!r} could not be loaded ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "the artifact is damaged: write it again."
        ) from None
    if hub:
        from transferkit.finetuning.hub import restore_freeze

        restore_freeze(model, manifest.stages or [{}], file.parent / RECIPE)
    return manifest, model


def _manifest_or_none(folder: Path) -> Manifest | None:
    path = folder / MANIFEST
    try:
        return Manifest.from_json(json.loads(path.read_text()), str(path))
    except (OSError, json.JSONDecodeError, TransferkitError):  # none (a bare .keras file), or damaged: read_manifest's
        return None


def import_requirements(requires: list[dict[str, str]], folder: str | Path) -> None:
    """Import the packages an artifact's manifest names in `base.requires` (keras-hub, whose classes it holds).

    Raises:
        SettingsError: one is not installed (the message says how to install it).
    """
    for need in requires:
        try:
            importlib.import_module(need["module"])
        except ModuleNotFoundError as err:
            if err.name != need["module"]:
                raise
            raise SettingsError(f"{str(folder)!r} needs {need['module']} to load, which is not installed; expected "
                                f"it installed: {need.get('install', 'pip install ' + need['module'])}") from None


def write_json(path: Path, value: Any) -> None:
    """Write JSON through a temporary sibling file and a rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(_dumps(value))
    os.replace(tmp, path)


def write_manifest(folder: str | Path, manifest: Manifest | dict[str, Any]) -> Manifest:
    """Write `manifest` as the `manifest.json` of `folder` (through a rename), and return it as a `Manifest`.

    A dict (what a pipeline built) is first read as a `Manifest`, so what is written is checked; arrays,
    tuples and paths in it are written as JSON lists and strings, as `write_json` writes them.

    Raises:
        TransferkitError: the dict is not a transferkit manifest (the message names the file and the key).
    """
    path = Path(folder) / MANIFEST
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_json(json.loads(_dumps(manifest)), str(path))
    write_json(path, manifest.to_json())
    return manifest


def read_manifest(path: str | Path, kinds: tuple[str, ...] = ("encoder", "classifier")) -> Manifest:
    """The manifest of the artifact at `path`, checking it is one of `kinds`.

    Example:

    >>> read_manifest("saved_models/digits-classifier", ("classifier",)).num_classes   # doctest: +SKIP
    10

    Raises:
        SettingsError: `path` is not an artifact folder, or holds another kind.
        TransferkitError: its `manifest.json` is damaged: not JSON, or not a transferkit manifest (a missing
            key or one of the wrong type; the message names the file and the key).
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise SettingsError(f"Artifact {str(path)!r} does not exist; expected a folder written by transferkit.")
    if not manifest_path.is_file() or not (path / MODEL).is_file():
        raise SettingsError(
            f"{str(path)!r} is not a transferkit artifact; expected a folder with {MANIFEST} and {MODEL}."
        )
    try:
        value = json.loads(manifest_path.read_text())
    except json.JSONDecodeError:
        raise TransferkitError(f"{str(manifest_path)!r} is not valid JSON; the artifact is damaged.") from None
    manifest = Manifest.from_json(value, str(manifest_path))
    if manifest.kind not in kinds:
        raise SettingsError(f"{str(path)!r} is {_article(manifest.kind)} {manifest.kind} artifact; expected "
                            f"{' or '.join(f'{_article(kind)} {kind}' for kind in kinds)} artifact.")
    return manifest


def read_json(path: str | Path, name: str) -> Any:
    return json.loads((Path(path) / name).read_text())


@dataclasses.dataclass(frozen=True)
class Encoder:
    """A saved encoder as fine-tuning reads it before building on it: its folder, manifest, model, and the rows it
    trained on.

    `pretrained_on`: the indices of its training split (None when the folder holds no `split.json`).
    """

    path: Path
    manifest: Manifest
    model: Any
    pretrained_on: list[int] | None


def read_encoder(path: str | Path) -> Encoder:
    """The encoder artifact at `path`: its manifest (checked to be an encoder's), its model and its split's
    training rows.

    Raises:
        SettingsError: `path` is a file (the folder's `model.keras`, say), not the folder.
        SettingsError, TransferkitError: as `load_artifact` with the kind "encoder".
    """
    if Path(path).is_file():  # its model.keras, say: the split beside it would go unread, and the leak check with it
        raise SettingsError(f"Artifact {str(path)!r} is a file; expected the encoder's folder written by transferkit "
                            f"pretrain ({str(Path(path).parent)!r}?).")
    pretrained_on = read_json(path, SPLIT)["train"] if (Path(path) / SPLIT).is_file() else None
    manifest, model = load_artifact(path, ("encoder",))
    return Encoder(Path(path), manifest, model, pretrained_on)


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


def out_dir(recipe: Any, kind: str) -> Path:
    """A recipe's output folder: `recipe.out`, else `saved_models/<name>` (`recipe.name`, else a name from the data
    spec and the kind)."""
    if recipe.out:
        return Path(recipe.out)
    return default_out(recipe.name or f"{data_slug(recipe.data)}-{kind}")


def check_out_writable(out: Path) -> None:
    """Refuse, before any work, an output folder whose nearest existing ancestor cannot be written."""
    ancestor = Path(out).absolute()
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir() or not os.access(ancestor, os.W_OK | os.X_OK):
        raise SettingsError(f"--out {str(out)!r} cannot be written: {str(ancestor)!r} is not a writable folder.")


def data_slug(spec: str) -> str:
    """A data spec as a folder name: `digits`, `dir:~/photos/` -> `photos`, `tfds:mnist:train` -> `mnist`."""
    scheme, _, arg = spec.partition(":")
    if not arg:
        return scheme
    stem = Path(arg.split(":")[0].rstrip("/")).stem if scheme in ("npz", "dir") else arg.split(":")[0]
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in stem) or scheme


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2, sort_keys=True, default=_jsonable)


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, (set, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _article(word: str) -> str:
    return "an" if word[:1] in "aeiou" else "a"
