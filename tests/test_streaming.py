"""Image folders stream: no run decodes a whole folder, and streaming gives what decoded arrays give."""

import json

import numpy as np
import pytest
import transferkit as tk
from transferkit.data.sources import load_data, pipeline, split_data
from transferkit.data.image_files import ImageFiles
from transferkit.training.runs import channel_stats

from helpers import photos

FAST = dict(units=(8,), lr=1e-3, batch_size=16, verbose=False)


def test_a_folder_run_never_decodes_the_whole_folder(tmp_path, no_whole_decoding):
    spec = f"dir:{photos(tmp_path / 'photos')}"
    encoder = tk.pretrain(data=spec, task="denoising", noise=0.2, epochs=1, out=str(tmp_path / "enc"), **FAST)
    classifier = tk.finetune(from_=str(encoder.artifact), data=spec, head_epochs=1, epochs=1, unfreeze_top=1,
                             out=str(tmp_path / "clf"), **FAST)
    stages = classifier.manifest["stages"]
    assert [s["unfreeze_top"] for s in stages] == [0, 1] and "caching_seconds" in stages[0]
    report = tk.evaluate(classifier.artifact, spec, verbose=False)
    assert report.metrics["examples"] == classifier.manifest["split"]["sizes"]["test"]
    rows = tk.predict(classifier.artifact, spec, output=str(tmp_path / "p.csv"), verbose=False)
    assert len(rows) == 42 and (tmp_path / "p.csv").read_text().count("\n") == 43
    assert max(no_whole_decoding) <= 8  # the reconstructions picture's samples


def test_a_folder_streams_what_its_decoded_arrays_give(tmp_path):
    spec = f"dir:{photos(tmp_path / 'photos')}"
    files = load_data(spec, verbose=False)
    x = np.asarray(files.x)
    np.savez(tmp_path / "same.npz", x=x, y=files.y)
    arrays = load_data(f"npz:{tmp_path}/same.npz")
    assert isinstance(files.x, ImageFiles) and files.x.shape == x.shape
    a, b = split_data(files, seed=3, label_fraction=0.5), split_data(arrays, seed=3, label_fraction=0.5)
    assert a.to_dict() == b.to_dict()
    for got, want in zip(channel_stats(files.x[a.train]), channel_stats(x[a.train])):
        np.testing.assert_allclose(got, want, rtol=1e-5)
    streamed = [(bx.numpy(), by.numpy()) for bx, by in pipeline(files.x, files.y, 8, shuffle=True, seed=5)]
    held = [(bx.numpy(), by.numpy()) for bx, by in pipeline(x, files.y, 8, shuffle=True, seed=5)]
    for (sx, sy), (hx, hy) in zip(streamed, held, strict=True):
        np.testing.assert_array_equal(sx, hx)
        np.testing.assert_array_equal(sy, hy)

    def run(data, name):
        enc = tk.pretrain(data=data, task="denoising", noise=0.2, epochs=2, out=str(tmp_path / f"enc-{name}"), **FAST)
        clf = tk.finetune(from_=str(enc.artifact), data=data, head_epochs=2, epochs=1, unfreeze_top=1,
                          out=str(tmp_path / f"clf-{name}"), **FAST)
        return enc, clf

    (enc_f, clf_f), (enc_a, clf_a) = run(spec, "files"), run(f"npz:{tmp_path}/same.npz", "arrays")
    for key in ("loss", "val_loss"):
        np.testing.assert_allclose(enc_f.history[key], enc_a.history[key], rtol=1e-4)
    np.testing.assert_allclose(clf_f.history["loss"], clf_a.history["loss"], rtol=1e-4)
    np.testing.assert_allclose(clf_f.metrics["test_loss"], clf_a.metrics["test_loss"], rtol=1e-4)


def test_image_files_index_without_decoding_and_decode_like_read_images(tmp_path):
    from transferkit.data.images import read_images

    root = photos(tmp_path / "photos", classes=("a",), per_class=5)
    paths = sorted(root.glob("a/*.png"))
    files = ImageFiles(paths, (9, 11), 3, "crop")
    picked = files[np.array([4, 1])][1:]
    assert isinstance(picked, ImageFiles) and picked.shape == (1, 9, 11, 3)
    assert picked.paths.tolist() == [str(paths[1])]
    np.testing.assert_array_equal(files[1], read_images([paths[1]], (9, 11), 3, resize="crop")[0])
    stretched = ImageFiles(paths, (9, 11), 3)  # decoded by the shortcut for plain 8-bit images
    np.testing.assert_array_equal(stretched.decode(), read_images(paths, (9, 11), 3))


def test_the_fingerprint_of_a_folder_follows_names_sizes_and_times(tmp_path):
    root = photos(tmp_path / "photos", classes=("a", "b"), per_class=3)
    first = load_data(f"dir:{root}", verbose=False).fingerprint
    assert load_data(f"dir:{root}", verbose=False).fingerprint == first
    assert load_data(f"dir:{root}", image_size=8, verbose=False).fingerprint != first
    (root / "b" / "00.png").rename(root / "b" / "99.png")
    assert load_data(f"dir:{root}", verbose=False).fingerprint != first


def test_predict_writes_json_as_json_dumps_would(classifier_dir, tmp_path):
    x = np.random.default_rng(0).uniform(0, 16, (5, 8, 8)).astype("float32")
    np.savez(tmp_path / "new.npz", x=x)
    rows = tk.predict(classifier_dir, f"npz:{tmp_path}/new.npz", output=str(tmp_path / "p.json"), verbose=False)
    assert (tmp_path / "p.json").read_text() == json.dumps(rows, indent=2) + "\n"
    assert json.loads((tmp_path / "p.json").read_text()) == rows


def test_diagnose_on_a_folder_decodes_only_the_batches_it_runs(tmp_path, monkeypatch):
    from transferkit.store import artifacts
    from transferkit.data.sources import Split
    from transferkit.commands.diagnose import diagnose

    spec = f"dir:{photos(tmp_path / 'photos')}"
    encoder = tk.pretrain(data=spec, task="denoising", noise=0.2, epochs=1, out=str(tmp_path / "enc"), **FAST)
    train = Split.from_dict(artifacts.read_json(encoder.artifact, artifacts.SPLIT)).train
    held = load_data(spec, verbose=False).x[train].decode()  # the training split as one array, decoded here
    decoded = []
    original = ImageFiles.decode

    def counted(self):
        decoded.append(len(self))
        return original(self)

    monkeypatch.setattr(ImageFiles, "__array__", lambda self, dtype=None, copy=None: pytest.fail("whole decode"))
    monkeypatch.setattr(ImageFiles, "decode", counted)
    streamed = diagnose(encoder.artifact, batches=2, batch_size=4)
    assert sum(decoded) == 8 and "training split of dir:" in streamed.source
    from_arrays = diagnose(encoder.artifact, (held, None), batches=2, batch_size=4)  # the same rows, sampled alike
    for a, b in zip(streamed.layers, from_arrays.layers, strict=True):
        np.testing.assert_allclose([a.mean, a.std, a.grad_norm], [b.mean, b.std, b.grad_norm], rtol=1e-5)
