"""`transferkit diagnose MODEL`: per-layer gradient and activation health, verdicts and remedies.

Registered on the group with `cli.add_command(diagnose)`. TensorFlow is
imported inside the command, so `transferkit --help` stays quick, and
`transferkit.cli` is imported only when the command runs, so `cli.py` may
import this module at its top without a circular import.

Example:

    transferkit diagnose saved_models/digits-classifier --plot health.png
    transferkit diagnose model.keras --data npz:data.npz --batches 8
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import click


def _handle_errors(f: Callable) -> Callable:
    """`transferkit.cli._handle_errors`, looked up when the command runs (no import cycle)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from transferkit.cli import _handle_errors as handle

        return handle(f)(*args, **kwargs)

    return wrapper


@click.command()
@click.argument("model", type=click.Path())
@click.option("--data", help="Data spec (digits, npz:PATH, dir:PATH, tfds:NAME). Default for an artifact: the "
                             "training split of its data; required for a .keras file.")
@click.option("--batches", type=int, default=4, show_default=True, help="Batches to run forward and backward.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Examples per batch.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the examples drawn.")
@click.option("--plot", type=click.Path(dir_okay=False), help="Write per-layer gradient and activation plots "
                                                               "to this PNG.")
@_handle_errors
def diagnose(model: str, data: str | None, batches: int, batch_size: int, seed: int, plot: str | None) -> None:
    """Per-layer activations and gradients of MODEL (an artifact folder or a .keras file) on a few batches,
    with verdicts (vanishing/exploding gradients, saturation, dead units, broken self-normalization)
    and the remedies that apply."""
    from transferkit.commands.diagnose import diagnose as run

    report = run(model, data, batches=batches, batch_size=batch_size, seed=seed)
    click.echo(report.format())
    if plot:
        click.echo(f"plot written to {report.plot(plot)}")
