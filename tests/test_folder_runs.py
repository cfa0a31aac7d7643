"""Image folders through whole runs: one class refused, skipped files and the resize mode kept for evaluation."""

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import transferkit as tk
from transferkit.errors import SettingsError

from helpers import run

FAST = dict(units=(8,), epochs=1, lr=1e-3, verbose=False)


def folder(root: Path, classes=("a", "b"), per_class=12, size=(10, 14)) -> Path:
    rng = np.random.default_rng(0)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            level = 60 + 120 * c
            pixels = np.clip(rng.normal(level, 20, size), 0, 255).astype("uint8")
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def test_a_folder_of_one_class_cannot_be_finetuned(tmp_path):
    data = folder(tmp_path / "photos", classes=("cats",))
    encoder = tk.pretrain(data=f"dir:{data}", out=str(tmp_path / "enc"), **FAST).artifact  # unlabeled use is fine
    done = run("finetune", "--from", str(encoder), "--data", f"dir:{data}", "--out", str(tmp_path / "clf"))
    assert done.exit_code == 2
    assert done.stderr.strip().splitlines()[-1] == (
        f"Error: Data 'dir:{data}' has 1 class ('cats'); expected at least 2 classes to train a classifier.")
    assert not (tmp_path / "clf").exists()


def test_skipped_files_and_the_resize_mode_are_recorded_and_reused(tmp_path):
    data = folder(tmp_path / "photos")
    (data / "b" / "broken.png").write_bytes(b"not a png")
    spec = f"dir:{data}"
    with pytest.raises(SettingsError, match="broken.png"):
        tk.pretrain(data=spec, out=str(tmp_path / "refused"), **FAST)
    encoder = tk.pretrain(data=spec, skip_bad_files=True, resize="crop", image_size=8, out=str(tmp_path / "enc"),
                          **FAST).artifact
    classifier = tk.finetune(from_=str(encoder), data=spec, skip_bad_files=True, resize="crop", image_size=8,
                             head_epochs=1, epochs=0, lr=1e-3, out=str(tmp_path / "clf"), verbose=False)
    manifest = json.loads((classifier.artifact / "manifest.json").read_text())
    assert manifest["resize"] == "crop" and manifest["image_size"] == 8
    assert manifest["data"]["skipped"] == [str(data / "b" / "broken.png")]
    # evaluate reads the folder the way training did: the same fingerprint, so the test split alone
    report = tk.evaluate(classifier.artifact, spec, verbose=False)
    assert report.metrics["examples"] == manifest["split"]["sizes"]["test"]


def test_evaluate_and_predict_skip_bad_files_when_asked(tmp_path):
    # a classifier trained on a clean folder meets a folder with a broken file, as the error tells the user
    data = folder(tmp_path / "photos")
    encoder = tk.pretrain(data=f"dir:{data}", out=str(tmp_path / "enc"), **FAST).artifact
    classifier = tk.finetune(from_=str(encoder), data=f"dir:{data}", head_epochs=1, epochs=0, lr=1e-3,
                             out=str(tmp_path / "clf"), verbose=False).artifact
    new = folder(tmp_path / "new", per_class=3)
    broken = new / "b" / "broken.png"
    broken.write_bytes(b"not a png")
    for command in (["evaluate", str(classifier), "--data", f"dir:{new}"], ["predict", str(classifier), f"dir:{new}"]):
        refused = run(*command)
        assert refused.exit_code == 2 and "broken.png" in refused.stderr and "--skip-bad-files" in refused.stderr
        done = run(*command, "--skip-bad-files")
        assert done.exit_code == 0, done.stderr[-800:]
    assert tk.evaluate(classifier, f"dir:{new}", skip_bad_files=True, verbose=False).metrics["examples"] == 6
    # a folder's rows are named by their file's path in the folder; a line says where they were written
    output = tmp_path / "predictions.csv"
    done = run("predict", str(classifier), f"dir:{new}", "--skip-bad-files", "--output", str(output))
    assert done.exit_code == 0 and f"6 predictions written to {output}" in done.stderr
    named = [line.split(",")[0] for line in output.read_text().splitlines()[1:]]
    readable = [p.relative_to(new).as_posix() for p in new.rglob("*.png") if p != broken]
    assert sorted(named) == sorted(readable) and len(named) == 6
    # a folder of other sizes reaches the size the model takes (it chose its training folder's common size)
    other = folder(tmp_path / "other", per_class=3, size=(20, 9))
    assert tk.evaluate(classifier, f"dir:{other}", verbose=False).metrics["examples"] == 6
    rows = tk.predict(classifier, f"dir:{other}", verbose=False)
    assert sorted(row["input"] for row in rows) == sorted(p.relative_to(other).as_posix() for p in other.rglob("*.png"))
    # a folder given as a path, not a spec, is named with the spec to use
    done = run("predict", str(classifier), str(new / "a"))
    assert done.exit_code == 2 and done.stderr.strip().splitlines() == [
        f"Error: Input '{new / 'a'}' is a folder; pass it as the data spec dir:{new / 'a'} (its images, in class "
        "folders or not)."]
    good = [str(p) for p in sorted((new / "a").glob("*.png"))]
    rows = tk.predict(classifier, [*good, str(broken)], skip_bad_files=True, verbose=False)
    assert [row["input"] for row in rows] == good  # the broken file is left out, the others keep their names
    with pytest.raises(SettingsError, match="broken.png"):
        tk.predict(classifier, [*good, str(broken)], verbose=False)



def test_finetune_from_an_encoder_reads_folders_as_its_pretraining_did(tmp_path):
    # pretraining skipped a broken file and chose the folder's median size; fine-tuning needs neither flag again
    unlabeled = folder(tmp_path / "photos", size=(10, 14))
    (unlabeled / "b" / "broken.png").write_bytes(b"not a png")
    encoder = tk.pretrain(data=f"dir:{unlabeled}", skip_bad_files=True, out=str(tmp_path / "enc"), **FAST).artifact
    for name, data in (("same", unlabeled), ("other", folder(tmp_path / "labeled", size=(20, 9)))):
        done = tk.finetune(from_=str(encoder), data=f"dir:{data}", head_epochs=1, epochs=0, lr=1e-3,
                           out=str(tmp_path / name), verbose=False)
        manifest = json.loads((done.artifact / "manifest.json").read_text())
        assert manifest["input_shape"] == [10, 14, 1], name
    assert manifest["data"]["skipped"] == []
    same = json.loads((tmp_path / "same" / "manifest.json").read_text())
    assert same["data"]["skipped"] == [str(unlabeled / "b" / "broken.png")]
    # the last stage trained the head on cached outputs; the saved optimizer still matches the one Keras rebuilds
    import keras

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keras.models.load_model(tmp_path / "same" / "model.keras")
    assert not [w for w in caught if "optimizer" in str(w.message)], [str(w.message) for w in caught]
