"""Pictures of a pretraining run: image grids (reconstructions, samples, views) and loss curves.

Figures are plain `matplotlib.figure.Figure` objects drawn with the Agg canvas,
so nothing here touches matplotlib's global backend or pyplot state; each PNG
is written through a temporary file and a rename, so a crash never leaves half
a picture.

Example:

>>> import numpy as np
>>> from transferkit.store.pictures import image_grid, loss_figure, write_pictures
>>> grid = image_grid([("inputs", np.zeros((4, 8, 8, 1)))], value_range=(0, 16))
>>> curve = loss_figure({"loss": [1.0, 0.5], "val_loss": [1.1, 0.7]})
>>> write_pictures("/tmp", {"grid.png": grid, "loss.png": curve})   # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def as_images(x: np.ndarray) -> np.ndarray:
    """`(N, H, W)` gray or `(N, H, W, 3)` color images to show for inputs of any shape.

    Images with one channel lose it; vectors of a square length become square
    images, other vectors one-row strips.

    Example:

    >>> as_images(np.zeros((2, 64))).shape
    (2, 8, 8)
    """
    x = np.asarray(x, dtype="float32")
    if x.ndim == 4:
        return x[..., 0] if x.shape[-1] == 1 else x[..., :3]
    if x.ndim == 3:
        return x
    flat = x.reshape(len(x), -1)
    side = math.isqrt(flat.shape[1])
    return flat.reshape(len(x), side, side) if side * side == flat.shape[1] else flat[:, None, :]


def image_grid(rows: Sequence[tuple[str, np.ndarray]], value_range: tuple[float, float] | None = None,
               titles: Sequence[Sequence[str]] | None = None, title: str | None = None) -> Figure:
    """One row of images per `(label, images)` pair, all shown on the same gray scale.

    Args:
        rows: Sequence of `(label, images)`; `images` of any shape `as_images` takes.
        value_range: Optional `(low, high)` of the color scale. Defaults to the images' own range.
        titles: Optional per-image captions, one sequence per row. Defaults to `None`.
        title: Optional figure title. Defaults to `None`.

    Returns:
        A `matplotlib.figure.Figure` (Agg canvas).
    """
    shown = [(label, as_images(images)) for label, images in rows]
    ncols = max(len(images) for _, images in shown)
    lo, hi = value_range if value_range is not None else (
        min(float(i.min()) for _, i in shown), max(float(i.max()) for _, i in shown))
    fig = Figure(figsize=(1.1 * ncols + 1.2, 1.25 * len(shown) + (0.4 if title else 0.1)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(shown), ncols, squeeze=False)
    for r, (label, images) in enumerate(shown):
        for c in range(ncols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c >= len(images):
                ax.set_axis_off()
                continue
            image = images[c]
            if image.ndim == 3:  # color: scale into [0, 1]
                ax.imshow(np.clip((image - lo) / max(hi - lo, 1e-12), 0, 1))
            else:
                ax.imshow(image, cmap="gray_r" if _dark_on_light(lo, hi) else "gray", vmin=lo, vmax=hi,
                          interpolation="nearest", aspect="auto" if image.shape[0] == 1 else "equal")
            if titles is not None and c < len(titles[r]):
                ax.set_title(titles[r][c], fontsize=7)
        axes[r][0].set_ylabel(label, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def loss_figure(history: dict[str, list[float]], keys: Sequence[str] | None = None,
                bands: Sequence[float] | None = None, title: str | None = None) -> Figure:
    """Training curves of `keys` (default: every `*loss` entry of the history) against the epoch.

    Args:
        history: Dict of lists, as Keras's `History.history` or `history.json`.
        keys: Optional names to plot. Defaults to every key ending in `loss`.
        bands: Optional epoch boundaries to mark (the layers of greedy stacking). Defaults to `None`.
        title: Optional title. Defaults to `None`.
    """
    keys = list(keys) if keys is not None else [k for k in sorted(history) if k.endswith("loss")]
    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for key in keys:
        values = history.get(key, [])
        if values:
            ax.plot(np.arange(1, len(values) + 1), values, marker="." if len(values) < 30 else None, label=key)
    for edge in bands or ():
        ax.axvline(edge + 0.5, color="0.75", linewidth=0.8, linestyle="--")
    if not any(history.get(k) for k in keys):
        ax.text(0.5, 0.5, "no training epochs", ha="center", va="center", transform=ax.transAxes)
    else:
        ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as a PNG through a temporary sibling file and a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        FigureCanvasAgg(fig)
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=dpi)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_pictures(folder: str | os.PathLike, figures: dict[str, Figure]) -> list[str]:
    """Save each `name: figure` into `folder`; the names written."""
    for name, fig in figures.items():
        save_figure(fig, Path(folder) / name)
    return sorted(figures)


def _dark_on_light(lo: float, hi: float) -> bool:
    """Data whose background is its low end (digits, MNIST) reads best dark on light."""
    return lo >= 0 and hi > lo
