"""What transferkit.finetune costs over the same training written by hand in plain Keras.

Both sides, in the same process, alternating, do one fine-tuning epoch of the
same classifier (the same saved encoder plus a softmax head, base frozen) on
the same labeled digits with the same optimizer and batch size, validating on
the validation split, then evaluate on the test split and save the model. transferkit also writes its manifest,
recipe and split. transferkit runs with `schedule="constant"` and
`cache_features=False`, so both sides do the same computation (its defaults,
1cycle with momentum cycling and cached head features, are other training).
transferkit seeds every run (`keras.utils.set_random_seed`, whose
`tf.random.set_seed` clears TensorFlow's cache of eager kernels, so the run's
eager ops build theirs again). The plain-Keras side runs twice, seeded the same
way (the same training, as reproducible: the goal's baseline, ratio <= 1.02)
and unseeded (a script that does not promise the same result twice). Prints the
median time of each and both ratios.

    python bench/overhead.py [--repeats 5] [--label-fraction 1.0]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def by_hand(encoder_dir: Path, x, y, val, test, batch_size: int, lr: float, out: Path,
            seed: int | None = None) -> None:
    import keras
    import tensorflow as tf

    if seed is not None:
        keras.utils.set_random_seed(seed)
    encoder = keras.saving.load_model(encoder_dir / "model.keras")
    encoder.trainable = False
    inputs = keras.Input(x.shape[1:])
    outputs = keras.layers.Dense(10, activation="softmax")(encoder(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Nadam(lr), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    train = tf.data.Dataset.from_tensor_slices((x, y)).cache().shuffle(len(x), seed=0).batch(batch_size)
    val_data = tf.data.Dataset.from_tensor_slices(val).cache().batch(batch_size).prefetch(tf.data.AUTOTUNE)
    model.fit(train.prefetch(tf.data.AUTOTUNE), validation_data=val_data, epochs=1, verbose=0)
    model.evaluate(tf.data.Dataset.from_tensor_slices(test).batch(batch_size), verbose=0)
    model.save(out / "model.keras")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--label-fraction", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    import transferkit as tk
    from transferkit.data.sources import load_data, split_data

    work = Path(tempfile.mkdtemp(prefix="tk-bench-"))
    encoder_dir = tk.pretrain(data="digits", epochs=2, out=str(work / "encoder"), verbose=False).artifact
    data = load_data("digits")
    split = split_data(data, seed=0, label_fraction=args.label_fraction)
    x, y = data.x[split.labeled], data.y[split.labeled]
    lr = 1e-3

    def ours(i: int) -> None:
        tk.finetune(from_=str(encoder_dir), label_fraction=args.label_fraction, head_epochs=1, epochs=0,
                    batch_size=args.batch_size, lr=lr, schedule="constant", cache_features=False,
                    out=str(work / f"ours{i}"), verbose=False)

    def theirs(i: int, seed: int | None = 0) -> None:
        out = work / f"theirs{i}-{seed}"
        out.mkdir()
        by_hand(encoder_dir, x, y, (data.x[split.val], data.y[split.val]), (data.x[split.test], data.y[split.test]),
                args.batch_size, lr, out, seed=seed)

    def unseeded(i: int) -> None:
        theirs(i, seed=None)

    ours(-1), theirs(-1), unseeded(-1)  # warm up: imports, first traces
    sides = (("transferkit", ours), ("plain keras", theirs), ("unseeded", unseeded))
    times: dict[str, list[float]] = {name: [] for name, _ in sides}
    for i in range(args.repeats):
        for name, fn in sides:
            start = time.perf_counter()
            fn(i)
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"one fine-tuning epoch on {len(x)} labeled digits, batch {args.batch_size}, {args.repeats} repeats")
    for name, value in median.items():
        print(f"  {name:12s} median {value:.3f} s  (all: {', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  ratio transferkit / plain keras (seeded alike) = {median['transferkit'] / median['plain keras']:.3f}")
    print(f"  ratio transferkit / plain keras unseeded     = {median['transferkit'] / median['unseeded']:.3f}")


if __name__ == "__main__":
    main()
