"""MC dropout prediction batched (one call on the repeated batch) against a loop of model calls.

30 samples on 1,000 digits with a small classifier that has dropout before its
head. The loop calls a model whose dropout stays on (the same layers) once per
sample; the batched way repeats the inputs 30 times and makes one call per chunk.
Same process, alternating, median of 5. Target >= 3x.

    python bench/mc_predict.py [--samples 30] [--examples 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--examples", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    import keras

    import transferkit as tk
    from transferkit.data.sources import load_data
    from transferkit.pieces.uncertainty import mc_predict, monte_carlo_model

    work = tempfile.mkdtemp(prefix="tk-bench-mc-")
    encoder = tk.pretrain(epochs=1, out=f"{work}/enc", verbose=False).artifact
    model = tk.finetune(from_=str(encoder), head_epochs=1, epochs=0, dropout=0.3, out=f"{work}/clf",
                        verbose=False).model
    x = load_data("digits").x[:args.examples]
    mc_model = monte_carlo_model(model)

    def batched():
        return mc_predict(model, x, samples=args.samples, batch_size=len(x), mc_model=mc_model).mean

    def loop():
        return np.mean([keras.ops.convert_to_numpy(mc_model(x, training=False)) for _ in range(args.samples)], axis=0)

    batched(), loop()  # warm up: traces
    times = {"batched": [], "loop": []}
    for _ in range(args.repeats):
        for name, fn in (("batched", batched), ("loop", loop)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    median = {k: statistics.median(v) for k, v in times.items()}
    print(f"MC dropout, {args.samples} samples on {len(x)} digits, median of {args.repeats}")
    print(f"  batched (one call on the repeated batch): {median['batched'] * 1000:.1f} ms")
    print(f"  loop of {args.samples} model calls:             {median['loop'] * 1000:.1f} ms")
    print(f"  speed-up = {median['loop'] / median['batched']:.1f}x")


if __name__ == "__main__":
    main()
