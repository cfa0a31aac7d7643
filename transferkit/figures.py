"""Writing a matplotlib figure to a PNG atomically; no Keras, no TensorFlow.

Shared by the pieces (the LR finder's and the health report's plots) and the
store (a run's pictures), so neither reaches into the other's room.

Example:

>>> from matplotlib.figure import Figure
>>> from transferkit.figures import save_figure
>>> fig = Figure(figsize=(2, 2))
>>> fig.add_subplot().plot([0, 1], [1, 0])                      # doctest: +SKIP
>>> save_figure(fig, "/tmp/line.png")                          # doctest: +SKIP
PosixPath('/tmp/line.png')
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Write `fig` as a PNG through a temporary sibling file and a rename."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

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
