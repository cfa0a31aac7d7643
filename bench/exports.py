"""Every export format side by side: file size, difference from Keras, accuracy, batch-1 latency in its runtime.

Two digits classifiers: the demo's kind (a SELU encoder pretrained as a
denoising autoencoder, fine-tuned with MC dropout before its head), and a
MobileNetV2 at 32x32 (alpha 1.0, from `weights=None`: trained on the digits'
training split for a few epochs, its BatchNorm statistics then set from the
data by a training-mode call, and fine-tuned as `--base` with a new head, MC
dropout before it; a MobileNetV2 left with random weights has features that
carry almost nothing of the digits, logistic regression on them scores 0.20).
Each is exported as a SavedModel, ONNX, LiteRT and quantized LiteRT
(`transferkit export`, which checks each), then every format's `serve` is run
in its own runtime (TensorFlow, ONNX Runtime, the LiteRT interpreter, each with
its default threads) on the test split:

- size: the `serve` file (SavedModel: the folder, `serve_mc` included; Keras:
  `model.keras`, optimizer state included);
- max |diff|: largest absolute difference from the Keras model's probabilities;
- accuracy on the test split, and for quantized formats its drop from Keras's;
- latency: median of single-example calls, beside Keras's `predict_on_batch`.

    python bench/exports.py [--calls 200] [--quantize int8,dynamic,float16] [--mc-samples 10]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def mobilenetv2_base(path: Path, epochs: int = 8, side: int = 32, seed: int = 0) -> Path:
    """A MobileNetV2 digits classifier (from `weights=None`) trained on the digits' training split, saved to `path`.

    The split is `finetune --data digits`'s (seed 0), so fine-tuning on it as `--base` sees no test example.
    The model takes 0..255 RGB pixels at `side` x `side` scaled to [-1, 1] (`--preprocess tf`), as
    `finetune --base` feeds it; its BatchNorm layers use momentum 0.9 while training, then their statistics
    are set from the data by one training-mode call with momentum 0 on 512 training examples.
    """
    import keras

    from transferkit.pieces.backbones import to_pixels
    from transferkit.data.sources import load_data, split_data

    keras.utils.set_random_seed(seed)
    data = load_data("digits", verbose=False)
    train = split_data(data, seed=seed).train
    inputs = keras.Input(data.input_shape)
    pixels = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(to_pixels(inputs, data.value_range, (side, side), 3))
    adapter = keras.Model(inputs, pixels)
    base = keras.applications.MobileNetV2(weights=None, input_shape=(side, side, 3), classes=10)
    norms = [layer for layer in base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    for layer in norms:
        layer.momentum = 0.9
    x = keras.ops.convert_to_numpy(adapter(data.x[train]))
    base.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    base.fit(x, data.y[train], epochs=epochs, batch_size=64, verbose=0)
    for layer in norms:
        layer.momentum = 0.0
    base(x[:512], training=True)
    for layer in norms:
        layer.momentum = 0.999
    base.save(path)
    return path


def latency(fn, x: np.ndarray, calls: int) -> float:
    """Median seconds of `fn(x)` over `calls` calls, after 10 warm-up calls."""
    for _ in range(10):
        fn(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def size_of(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size


def rows_for(name: str, artifact: Path, quantizations: list[str], calls: int, mc_samples: int) -> list[dict]:
    import keras

    import transferkit as tk
    from transferkit.data.sources import Split, load_data
    from transferkit.commands.runners import open_endpoint
    from transferkit.pieces.uncertainty import deterministic_model

    tk.export(artifact, formats="savedmodel,onnx,litert", mc_samples=mc_samples)
    for quantize in quantizations:
        tk.export(artifact, formats="litert", quantize=quantize, mc_samples=mc_samples)
    model = deterministic_model(tk.load_model(artifact))
    data = load_data("digits", verbose=False)
    test = Split.from_dict(json.loads((artifact / "split.json").read_text())).test
    x, y = data.x[test], data.y[test]
    expected = np.concatenate([keras.ops.convert_to_numpy(model(x[i:i + 32], training=False))
                               for i in range(0, len(x), 32)])
    keras_accuracy = float(np.mean(expected.argmax(1) == y))
    one = x[:1]
    keras_latency = latency(model.predict_on_batch, one, calls)
    rows = [{"model": name, "format": "Keras", "examples": len(x), "bytes": size_of(artifact / "model.keras"),
             "diff": 0.0, "accuracy": keras_accuracy, "drop": None, "latency": keras_latency, "ratio": 1.0}]
    folders = {"SavedModel": artifact / "serving", "ONNX": artifact / "serving-onnx",
               "LiteRT": artifact / "serving-litert",
               **{f"LiteRT {q}": artifact / f"serving-litert-{q}" for q in quantizations}}
    files = {"SavedModel": "", "ONNX": "serve.onnx"}
    for fmt, folder in folders.items():
        serve = open_endpoint(folder, "serve")
        got = np.concatenate([serve(x[i:i + 32])["probabilities"] for i in range(0, len(x), 32)])
        accuracy = float(np.mean(got.argmax(1) == y))
        seconds = latency(serve, one, calls)
        rows.append({"model": name, "format": fmt, "bytes": size_of(folder / files.get(fmt, "serve.tflite")),
                     "diff": float(np.max(np.abs(got - expected))), "accuracy": accuracy,
                     "drop": keras_accuracy - accuracy if " " in fmt else None, "latency": seconds,
                     "ratio": seconds / keras_latency})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | format | size | max abs diff vs Keras | test accuracy (drop) | batch-1 latency | "
             "vs Keras predict_on_batch |", "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        drop = f" ({r['drop']:+.4f})" if r["drop"] is not None else ""
        lines.append(f"| {r['model']} | {r['format']} | {r['bytes'] / 1024:,.0f} KiB | {r['diff']:.2g} | "
                     f"{r['accuracy']:.4f}{drop} | {r['latency'] * 1000:.3f} ms | {r['ratio']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=200, help="Timed single-example calls per format.")
    parser.add_argument("--quantize", default="int8,dynamic,float16", help="LiteRT quantizations to add.")
    parser.add_argument("--mc-samples", type=int, default=10, help="serve_mc's samples (not timed here).")
    parser.add_argument("--base-epochs", type=int, default=8, help="Epochs of training MobileNetV2 on the digits.")
    args = parser.parse_args()
    import transferkit as tk

    work = Path(tempfile.mkdtemp(prefix="tk-bench-exports-"))
    quantizations = [q for q in args.quantize.split(",") if q]
    started = time.perf_counter()
    tk.pretrain(data="digits", task="denoising", units=(64, 32), epochs=3, batch_size=64, out=str(work / "enc"),
                verbose=False)
    demo = tk.finetune(from_=str(work / "enc"), label_fraction=1.0, head_epochs=10, epochs=3, unfreeze_top=2,
                       lr=0.03, dropout=0.3, mc_dropout=True, out=str(work / "demo"), verbose=False).artifact
    base = mobilenetv2_base(work / "mobilenetv2.keras", epochs=args.base_epochs)
    mobilenet = tk.finetune(data="digits", base=str(base), preprocess="tf", label_fraction=1.0, head_epochs=10,
                            epochs=0, unfreeze_top=0, lr=0.01, dropout=0.2, mc_dropout=True,
                            out=str(work / "mobilenetv2"), verbose=False).artifact
    from transferkit.data.sources import Split, load_data, split_data

    test = Split.from_dict(json.loads((Path(mobilenet) / "split.json").read_text())).test
    assert set(test).isdisjoint(split_data(load_data("digits", verbose=False), seed=0).train)  # no test leak
    rows = (rows_for("digits (SELU encoder)", Path(demo), quantizations, args.calls, args.mc_samples)
            + rows_for("MobileNetV2 32x32", Path(mobilenet), quantizations, args.calls, args.mc_samples))
    print(f"\nexports of two digits classifiers; test split ({rows[0]['examples']} examples); batch-1 latency: median "
          f"of {args.calls} calls, each runtime's default threads; {time.perf_counter() - started:.0f} s in all")
    print(table(rows))


if __name__ == "__main__":
    main()
