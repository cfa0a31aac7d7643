"""Progress bars show on a terminal for long passes, and never when the caller asked for quiet (verbose=False)."""

import contextlib
import io

import numpy as np
import pytest
from PIL import Image

import transferkit as tk
from transferkit.data import progress
from transferkit.data.sources import load_data


class Terminal(io.StringIO):
    """stderr as a terminal would be, keeping what was written."""

    def isatty(self) -> bool:
        return True


@pytest.fixture
def terminal(monkeypatch):
    """Every pass is long enough for a bar; `with terminal:` makes stderr a terminal (pytest resets it per phase)."""
    monkeypatch.setattr(progress, "PROGRESS_FROM", 0)
    return Terminal()


def terminal_stderr(stream):
    return contextlib.redirect_stderr(stream)


def folder(root, per_class=6):
    rng = np.random.default_rng(0)
    for c, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype(np.uint8)).save(root / name / f"{i}.png")
    return root


def test_a_long_pass_shows_a_bar_on_a_terminal_unless_quiet(tmp_path, terminal):
    spec = f"dir:{folder(tmp_path / 'photos')}"
    with terminal_stderr(terminal):
        load_data(spec)
    shown = terminal.getvalue()
    assert "checking images" in shown and f"{spec}: 12 images" in shown
    terminal.seek(0)
    terminal.truncate()
    with terminal_stderr(terminal), progress.quiet():
        load_data(spec)
    assert terminal.getvalue() == ""


def test_commands_with_verbose_false_show_no_bar(tmp_path, terminal):
    spec = f"dir:{folder(tmp_path / 'photos')}"
    fast = dict(units=(8,), lr=1e-3, batch_size=4, verbose=False)
    with terminal_stderr(terminal):
        run_quietly_then_not(tmp_path, spec, fast, terminal)


def run_quietly_then_not(tmp_path, spec, fast, terminal):
    encoder = tk.pretrain(data=spec, task="denoising", noise=0.2, epochs=1, out=str(tmp_path / "enc"), **fast)
    classifier = tk.finetune(from_=str(encoder.artifact), data=spec, head_epochs=1, epochs=0,
                             out=str(tmp_path / "clf"), **fast)
    tk.evaluate(classifier.artifact, spec, verbose=False)
    tk.predict(classifier.artifact, spec, verbose=False)
    assert terminal.getvalue() == ""
    tk.predict(classifier.artifact, spec, output=str(tmp_path / "p.csv"))  # verbose: the bars come back
    assert "predicting" in terminal.getvalue()
