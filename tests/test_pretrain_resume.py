"""Resume after a crash: a pretrain run interrupted after an epoch, rerun, continues from its backup."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import transferkit as tk
from transferkit.store.backup import Backup
from transferkit.errors import SettingsError

TINY = dict(data="digits", batch_size=64, units=(16, 8), filters=(4, 4), verbose=False)


class Interrupted(Exception):
    """Stands in for a kill right after a backup."""


@contextlib.contextmanager
def interrupted_after(monkeypatch, epoch):
    """Raise `Interrupted` right after the backup that says training goes on at `epoch`."""
    save = Backup.save

    def save_then_stop(self, model, optimizer, stage, at, history, **options):
        save(self, model, optimizer, stage, at, history, **options)
        if at == epoch:
            raise Interrupted(f"after epoch {epoch}")

    with monkeypatch.context() as patch:
        patch.setattr(Backup, "save", save_then_stop)
        with pytest.raises(Interrupted):
            yield


def backup_folder(out):
    return out.with_name(f".{out.name}.backup")


def backed_up_epoch(out):
    return json.loads((backup_folder(out) / "state.json").read_text())["epoch"]


def resume(out, capsys, **settings):
    """Rerun the command (printing), check it says it resumes, finishes and leaves no backup; its result."""
    capsys.readouterr()
    result = tk.pretrain(out=str(out), **{**TINY, **settings, "verbose": True})
    printed = capsys.readouterr().out
    assert f"resuming from the backup in {backup_folder(out)}: epoch " in printed, printed[-2000:]
    assert (out / "model.keras").is_file() and not backup_folder(out).exists()
    return result, printed


def assert_same_weights(a, b):
    assert len(a.model.weights) == len(b.model.weights)
    for x, y in zip(a.model.weights, b.model.weights):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=x.path)


@pytest.mark.parametrize("task,settings", [("autoencoder", {}), ("denoising", {"noise_kind": "dropout"})])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(task, settings, tmp_path, monkeypatch,
                                                                          capsys):
    settings = dict(task=task, epochs=4, **settings)
    clean = tk.pretrain(out=str(tmp_path / "clean"), **TINY, **settings)
    out = tmp_path / "enc"
    with interrupted_after(monkeypatch, 2):
        tk.pretrain(out=str(out), **TINY, **settings)
    assert not out.exists() and backed_up_epoch(out) == 2
    resumed, printed = resume(out, capsys, **settings)
    assert "epoch 3 of 4" in printed and "Epoch 3/4" in printed and "Epoch 2/4" not in printed
    assert_same_weights(resumed, clean)
    assert resumed.history == clean.history  # the epochs before the interruption come from the backup
    assert json.loads((out / "history.json").read_text())["loss"] == clean.history["loss"]


def test_a_backup_with_other_settings_is_refused_unless_restart(tmp_path, monkeypatch, capsys):
    out = tmp_path / "enc"
    with interrupted_after(monkeypatch, 1):
        tk.pretrain(out=str(out), epochs=3, **TINY)
    with pytest.raises(SettingsError) as refused:
        tk.pretrain(out=str(out), epochs=3, **{**TINY, "units": (16, 4)})
    message = str(refused.value)
    assert "\n" not in message and "holds a backup of a run with other settings (units)" in message
    assert "--restart" in message and backed_up_epoch(out) == 1  # refused, not discarded
    capsys.readouterr()
    result = tk.pretrain(out=str(out), epochs=3, restart=True, **{**TINY, "units": (16, 4), "verbose": True})
    assert "resuming" not in capsys.readouterr().out
    assert len(result.history["loss"]) == 3 and not backup_folder(out).exists()


def test_the_last_epoch_leaves_no_backup_behind(tmp_path, monkeypatch):
    saved = []
    save = Backup.save
    monkeypatch.setattr(Backup, "save",
                        lambda self, *args, **options: saved.append(args[3]) or save(self, *args, **options))
    tk.pretrain(out=str(tmp_path / "enc"), epochs=3, **TINY)
    # the state it starts from (a run that diverges at once leaves a backup), then every epoch's end but the last
    assert saved == [0, 1, 2] and not backup_folder(tmp_path / "enc").exists()


def test_the_start_is_backed_up_as_a_state_alone_and_continuing_from_it_starts_afresh(tmp_path, monkeypatch):
    settings = dict(task="denoising", noise_kind="dropout", epochs=2)  # dropout: its random states count too
    clean = tk.pretrain(out=str(tmp_path / "clean"), **TINY, **settings)
    out = tmp_path / "enc"
    with interrupted_after(monkeypatch, 0):  # a run that diverges, or is killed, in its first epoch
        tk.pretrain(out=str(out), **TINY, **settings)
    assert backed_up_epoch(out) == 0 and [p.name for p in backup_folder(out).iterdir()] == ["state.json"]
    with pytest.raises(SettingsError, match=r"other settings \(units\)"):  # still this run's backup
        tk.pretrain(out=str(out), **{**TINY, **settings, "units": (16, 4)})
    again = tk.pretrain(out=str(out), **TINY, **settings)
    assert again.history == clean.history and not backup_folder(out).exists()
    assert_same_weights(again, clean)


STACKED = dict(task="stacked", epochs=2)  # two blocks: epochs 1-2 and 3-4


@pytest.fixture(scope="module")
def clean_stacked(tmp_path_factory):
    return tk.pretrain(out=str(tmp_path_factory.mktemp("clean") / "enc"), **TINY, **STACKED)


@pytest.mark.parametrize("after,settings", [(3, {}), (2, {"backup_every": 5})], ids=["within-block2", "between-blocks"])
def test_stacked_resumes_and_ends_as_an_uninterrupted_run(after, settings, clean_stacked, tmp_path, monkeypatch,
                                                          capsys):
    out = tmp_path / "enc"
    with interrupted_after(monkeypatch, after):
        tk.pretrain(out=str(out), **TINY, **STACKED, **settings)
    resumed, printed = resume(out, capsys, **STACKED, **settings)
    assert f"epoch {after + 1} of 4" in printed and f"Epoch {after + 1}/4" in printed
    assert "stacked: block1 (1 of 2)" not in printed and "stacked: block2 (2 of 2)" in printed
    assert resumed.history["block"] == [1.0, 1.0, 2.0, 2.0]
    assert resumed.history == clean_stacked.history
    assert_same_weights(resumed, clean_stacked)


@pytest.mark.backend_neutral
def test_gan_resumes_with_both_players_and_their_optimizers(tmp_path, monkeypatch, capsys):
    settings = dict(task="gan", epochs=3)
    clean = tk.pretrain(out=str(tmp_path / "clean"), **TINY, **settings)
    out = tmp_path / "enc"
    with interrupted_after(monkeypatch, 2):
        tk.pretrain(out=str(out), **TINY, **settings)
    resumed, printed = resume(out, capsys, **settings)
    assert "epoch 3 of 3" in printed
    assert resumed.history == clean.history
    assert_same_weights(resumed, clean)


@pytest.mark.slow
def test_a_killed_pretrain_command_continues_when_rerun(tmp_path):
    out = tmp_path / "enc"
    command = [sys.executable, "-m", "transferkit.cli", "pretrain", "--task", "stacked", "--units", "16,8",
               "--epochs", "3", "--backup-every", "4", "--out", str(out)]
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    started = time.monotonic()
    while proc.poll() is None and time.monotonic() - started < 120:
        try:
            if backed_up_epoch(out) >= 4:  # in block 2
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    assert proc.poll() is None, "finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    done = subprocess.run(command, cwd=root, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "resuming from the backup" in done.stdout and "stacked: block1 (1 of 2)" not in done.stdout
    assert not backup_folder(out).exists()
    assert len(json.loads((out / "history.json").read_text())["loss"]) == 6
