"""Head-only training on cached base outputs against the normal frozen-base fit.

MobileNetV2 (weights none, 96x96 RGB inputs) with a new head, 10 head-only
epochs on 2,000 images, once with `cache_features` (the base runs once) and
once without (the base runs every epoch), in one run. The time is the whole
stage, caching pass included, as recorded in the manifest. Target >= 8x.

    python bench/head_cache.py [--images 2000] [--epochs 10] [--side 96]
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--side", type=int, default=96)
    args = parser.parse_args()

    import transferkit as tk

    work = Path(tempfile.mkdtemp(prefix="tk-bench-cache-"))
    rng = np.random.default_rng(0)
    # 1/0.7 so that the training split (70%) holds about --images images
    n = int(args.images / 0.7)
    np.savez(work / "images.npz", x=rng.integers(0, 256, (n, args.side, args.side, 3), dtype=np.uint8),
             y=rng.integers(0, 10, n))
    stages = {}
    for cache in (True, False):
        result = tk.finetune(data=f"npz:{work}/images.npz", backbone="mobilenetv2", weights="none",
                             head_epochs=args.epochs, epochs=0, batch_size=64, cache_features=cache,
                             out=str(work / f"clf-{cache}"), verbose=False)
        stages[cache] = result.manifest["stages"][0]
        sizes = result.manifest["split"]["sizes"]
    seconds = {cache: stage["seconds"] for cache, stage in stages.items()}
    print(f"MobileNetV2 at {args.side}x{args.side}, {sizes['labeled']} training and {sizes['val']} validation "
          f"images, {args.epochs} head-only epochs")
    print(f"  cached base outputs: {seconds[True]:.1f} s   (caching pass {stages[True]['caching_seconds']:.1f} s "
          "included)")
    print(f"  frozen base each epoch: {seconds[False]:.1f} s")
    print(f"  speed-up = {seconds[False] / seconds[True]:.1f}x")


if __name__ == "__main__":
    main()
