"""Progress bars for the passes over the data that are not `fit`, and the switch that silences them.

A bar shows on stderr when the pass is long (more than `PROGRESS_FROM` items),
stderr is a terminal, and no caller asked for quiet: `quiet()` silences every
bar (and the data summary line) inside it, so `verbose=False` given to a
command reaches the passes its helpers make without being handed down.

Example:

>>> from transferkit.data.progress import progress_bar, quiet
>>> with quiet(), progress_bar(10_000, "decoding images") as tick:
...     tick(64)
"""

from __future__ import annotations

import contextlib
import contextvars
import sys

PROGRESS_FROM = 300  # items: show a progress bar on passes over more than this many

_QUIET = contextvars.ContextVar("transferkit_quiet", default=False)


@contextlib.contextmanager
def quiet(enabled: bool = True):
    """Inside, no progress bar and no data summary line (when `enabled`; `quiet(False)` changes nothing)."""
    token = _QUIET.set(True) if enabled else None
    try:
        yield
    finally:
        if token is not None:
            _QUIET.reset(token)


def showing(verbose: bool = True) -> bool:
    """Whether to print progress: `verbose`, and not inside `quiet()`."""
    return verbose and not _QUIET.get()


@contextlib.contextmanager
def progress_bar(total: int, desc: str = "decoding images", unit: str = "image"):
    """A `tick(n=1)` that advances a bar on stderr by `n`, or does nothing.

    The bar shows when `total` is above `PROGRESS_FROM`, stderr is a terminal
    (logs and pipes get none, as tqdm's `disable=None`) and not inside `quiet()`.
    tqdm (installed with tensorflow-datasets), else keras's Progbar.
    """
    if total <= PROGRESS_FROM or not sys.stderr.isatty() or not showing():
        yield lambda n=1: None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        import keras

        bar = keras.utils.Progbar(total, unit_name=unit)
        yield lambda n=1: bar.add(n)
        return
    with tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, leave=False) as bar:
        yield lambda n=1: bar.update(n)
