"""Resume after a crash: kill -9 a staged finetune, rerun the same command, it finishes."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest

import transferkit as tk
from transferkit.errors import SettingsError

ROOT = Path(__file__).resolve().parents[1]


def command(encoder_dir, out):
    return [sys.executable, "-m", "transferkit.cli", "finetune", "--from", str(encoder_dir), "--unfreeze-schedule",
            "head:4,top1:4,all:4", "--label-fraction", "0.3", "--lr", "0.01", "--cache-features",
            "--backup-every", "3", "--out", str(out)]


def backup_state(out):
    path = out.with_name(f".{out.name}.backup") / "state.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def kill_when(proc, ready, timeout=120):
    started = time.monotonic()
    while time.monotonic() - started < timeout and proc.poll() is None:
        if ready():
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.05)
    return False


def finish(encoder_dir, out):
    done = subprocess.run(command(encoder_dir, out), capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return done.stdout


def accuracy_of(out):
    return json.loads((out / "manifest.json").read_text())["metrics"]["test_accuracy"]


def test_a_run_killed_between_stages_continues_from_its_backup(encoder_dir, tmp_path):
    out = tmp_path / "clf"
    proc = subprocess.Popen(command(encoder_dir, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = {}
    assert kill_when(proc, lambda: (state.update(backup_state(out) or {}) or state.get("epoch", 0) >= 5))
    assert not out.exists()
    printed = finish(encoder_dir, out)
    assert f"resuming from the backup" in printed and "epoch " in printed
    assert not backup_state(out) and not out.with_name(f".{out.name}.backup").exists()
    model = keras.saving.load_model(out / "model.keras")
    assert model.get_layer("head").weights
    history = json.loads((out / "history.json").read_text())
    assert len(history["loss"]) == 12  # every epoch once, across the interruption


def test_a_backup_with_other_settings_is_refused_unless_restart(encoder_dir, tmp_path):
    out = tmp_path / "clf"
    proc = subprocess.Popen(command(encoder_dir, out), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert kill_when(proc, lambda: (backup_state(out) or {}).get("epoch", 0) >= 2)
    with pytest.raises(SettingsError, match=r"holds a backup of a run with other settings \(label_fraction\)"):
        tk.finetune(from_=str(encoder_dir), unfreeze_schedule="head:4,top1:4,all:4", label_fraction=0.2, lr=0.01,
                    out=str(out), verbose=False)
    result = tk.finetune(from_=str(encoder_dir), unfreeze_schedule="head:1", label_fraction=0.2, lr=0.01,
                         restart=True, out=str(out), verbose=False)
    assert len(result.history["loss"]) == 1


@pytest.mark.slow
def test_five_kills_at_random_moments_still_finish_like_an_uninterrupted_run(encoder_dir, tmp_path):
    clean = tmp_path / "clean"
    finish(encoder_dir, clean)
    out = tmp_path / "clf"
    rng = random.Random(0)
    for _ in range(5):
        proc = subprocess.Popen(command(encoder_dir, out), cwd=ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(8, 16))  # after the imports: mid-epoch, mid-save or between stages
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        if out.exists():
            keras.saving.load_model(out / "model.keras")  # never corrupt
            break
    if not out.exists():
        finish(encoder_dir, out)
    assert abs(accuracy_of(out) - accuracy_of(clean)) < 0.1


def test_a_head_only_backup_restores_the_base_from_the_stage_start_and_the_head_from_its_last_save(tmp_path):
    from transferkit.store.backup import HEAD, Backup, BackupCallback

    def classifier(seed):
        keras.utils.set_random_seed(seed)
        inputs = keras.Input((4,))
        base = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, name="base")])
        head_layer = keras.layers.Dense(2, name="head")
        features_in = keras.Input((3,))
        return keras.Model(inputs, head_layer(base(inputs))), keras.Model(features_in, head_layer(features_in))

    model, head = classifier(0)
    head.compile("sgd", "mse")
    backup = Backup(tmp_path / "backup", {"run": 1})
    keep = BackupCallback(backup, model, stage=0, history={}, head=head)  # writes the whole model, then the head
    head.fit(np.ones((8, 3)), np.zeros((8, 2)), epochs=2, verbose=0, callbacks=[keep])
    assert (backup.folder / HEAD).is_file() and backup.state()["head_only"]
    expected = [np.array(w) for w in model.get_weights()]

    fresh, fresh_head = classifier(1)
    assert any(not np.array_equal(a, b) for a, b in zip(expected, fresh.get_weights()))
    backup.load_weights(fresh, fresh_head)
    for a, b in zip(expected, fresh.get_weights()):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(SettingsError, match="does not fit"):
        backup.load_weights(classifier(2)[0])  # a head-only backup needs the head to load into
