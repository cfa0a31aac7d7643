"""What pretraining and fine-tuning share: the result, data preparation, saving a run (its folder is chosen by
`store.artifacts.out_dir`)."""

from __future__ import annotations

import dataclasses
import datetime as dt
from pathlib import Path
from typing import Any

import numpy as np

from transferkit.store import artifacts
from transferkit.store.manifest import Manifest
from transferkit.data.pipelines import batches_of
from transferkit.data.sources import Data, Split, load_data, load_recipe_data, split_data
from transferkit.errors import SettingsError
from transferkit.recipe import Recipe


@dataclasses.dataclass
class Result:
    """What a command returns: the model, its training history, metrics and artifact folder.

    `manifest` is the artifact's manifest as JSON data (`Manifest.to_json()`, or the dict a pipeline wrote).
    """

    model: Any
    history: dict[str, list[float]]
    metrics: dict[str, float]
    artifact: Path | None
    manifest: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __repr__(self) -> str:
        metrics = ", ".join(f"{k}={v:.4g}" for k, v in self.metrics.items())
        return f"Result(artifact={str(self.artifact)!r}, {metrics})"


def load_like_artifact(spec: str, manifest: Manifest, verbose: bool = True, skip_bad_files: bool = False) -> Data:
    """Data `spec` read the way an artifact's training data was: its image size, resize mode, bad-file policy.

    Images reach the size the model takes (`--image-size`, else the height and
    width its training folder chose), whatever sizes the new folder's images have.
    Files that cannot be decoded are skipped if the artifact's training skipped some, or with `skip_bad_files`.
    """
    return load_data(spec, image_size=manifest.image_size or manifest.input_size, resize=manifest.resize,
                     skip_bad_files=skip_bad_files or bool(manifest.data.skipped), verbose=verbose)


def artifact_data(model_dir: str | Path, manifest: Manifest, spec: str | None = None,
                  verbose: bool = True, skip_bad_files: bool = False) -> tuple[Data, Split | None]:
    """Data `spec` (default: the artifact's own) read as the artifact's was, and the artifact's split when it is
    that same data (by fingerprint), else `None`.

    Raises:
        SettingsError: inputs of another shape than the artifact's model takes.
    """
    loaded = load_like_artifact(spec or manifest.data.spec, manifest, verbose, skip_bad_files)
    if loaded.input_shape != tuple(manifest.input_shape):
        raise SettingsError(f"The data's inputs have shape {loaded.input_shape}; the model in {str(model_dir)!r} "
                            f"takes {tuple(manifest.input_shape)}.")
    if loaded.fingerprint != manifest.data.fingerprint:
        return loaded, None
    return loaded, Split.from_dict(artifacts.read_json(Path(model_dir), artifacts.SPLIT))


def prepare(recipe: Recipe, split_seed: int | None = None) -> tuple[Data, Split]:
    """Load the recipe's data and split it with `split_seed` (the recipe's by default)."""
    data = load_recipe_data(recipe)
    split = split_data(
        data,
        seed=recipe.resolved_split_seed if split_seed is None else split_seed,
        test_fraction=recipe.test_fraction,
        val_fraction=recipe.val_fraction,
        label_fraction=recipe.label_fraction,
        label_seed=recipe.seed,
    )
    return data, split


def base_manifest(kind: str, recipe: Recipe, data: Data, split: Split) -> dict[str, Any]:
    """The manifest fields every artifact has, as the JSON dict a pipeline adds its kind's fields to.

    `save_run` reads the completed dict as a `Manifest` (checking it) before writing it.
    """
    return {
        "format": artifacts.FORMAT,
        "kind": kind,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "input_shape": list(data.input_shape),
        "input_dtype": "float32",
        "image_size": recipe.image_size,
        "resize": recipe.resize,
        "value_range": list(data.value_range),
        "data": {
            "spec": data.spec,
            "fingerprint": data.fingerprint,
            "num_examples": int(len(data.x)),
            "class_names": list(data.class_names) if data.class_names else None,
            "skipped": list(data.skipped),
        },
        "split": {
            "seed": split.seed,
            "test_fraction": recipe.test_fraction,
            "val_fraction": recipe.val_fraction,
            "label_fraction": recipe.label_fraction,
            "sizes": {"train": len(split.train), "val": len(split.val), "test": len(split.test),
                      "labeled": len(split.labeled)},
        },
        "versions": artifacts.versions(),
    }


def save_run(out: Path, model, recipe_text: str, manifest: Manifest | dict[str, Any], split: Split,
             history: dict[str, list[float]], figures: dict[str, Any] | None = None) -> Path:
    """Write the artifact folder atomically: model, recipe, manifest, split, history and pictures (the chief only).

    `recipe_text` is the recipe as TOML (`Recipe.to_toml`), made when the recipe was settled.

    The manifest is a `Manifest`, or its JSON dict (checked as one: see `artifacts.write_manifest`).
    The history is written twice: `history.json` as Keras logs it, and
    `history.csv` one row per epoch with its stage (from the manifest's `stages`).
    `figures` maps PNG file names to matplotlib figures, drawn into the same temporary folder.
    """
    from transferkit.training.curves import write_history_csv
    from transferkit.training.distributed import on_this_process
    from transferkit.training.runtime import is_chief

    if not is_chief():
        return out
    with artifacts.atomic_dir(out) as tmp, on_this_process():
        model.save(tmp / artifacts.MODEL)
        (tmp / artifacts.RECIPE).write_text(recipe_text)
        written = artifacts.write_manifest(tmp, manifest)
        artifacts.write_json(tmp / artifacts.SPLIT, split.to_dict())
        artifacts.write_json(tmp / "history.json", history)
        write_history_csv(tmp / "history.csv", history, written.stages)
        if figures:
            from transferkit.store.pictures import write_pictures

            write_pictures(tmp, figures)
    return out


def steps_per_epoch(examples: int, batch_size: int) -> int:
    return max(1, -(-examples // batch_size))


def channel_stats(x: Any) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance over every axis but the last (per channel, or per feature).

    An array in memory: numpy's `mean` and `var`. Image files: one streaming pass
    over all of them, batch by batch (float64 sums of each batch's centred
    values, combined exactly, Chan et al.), remembered for the same files.
    """
    from transferkit.data.image_files import ImageFiles

    if not isinstance(x, ImageFiles):
        axes = tuple(range(x.ndim - 1))
        return x.mean(axis=axes), x.var(axis=axes)
    key = x.key
    if key not in _STATS:
        count, mean, m2 = 0, np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
        for batch in batches_of(x, desc="channel statistics"):
            values = batch.reshape(-1, batch.shape[-1]).astype(np.float64)
            n, batch_mean = len(values), values.mean(axis=0)
            delta = batch_mean - mean
            m2 += ((values - batch_mean) ** 2).sum(axis=0) + delta ** 2 * count * n / (count + n)
            mean += delta * n / (count + n)
            count += n
        _STATS.clear()  # keep one: a run asks for its training part's statistics several times
        _STATS[key] = (mean.astype("float32"), (m2 / max(count, 1)).astype("float32"))
    return _STATS[key]


_STATS: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def print_line(text: str, verbose: bool) -> None:
    if verbose:
        print(text, flush=True)
