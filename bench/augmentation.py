"""Does augmentation pay on few labels? No augmentation vs `--augment light` vs `--mixup 0.2`, and `--tta` on top.

The digits as 8x8 images (`light`: rotations up to 10 degrees, zoom and
shifts up to 10%, no flips), a denoising encoder pretrained per seed, then
`finetune` with each setting at each label fraction and `evaluate --tta N` on
the held-out test split (20%). TTA uses the model's own augmentation, and
horizontal flips for the models trained without one. Also the head stage's
seconds: cached base outputs without augmentation, the base every epoch with it.

    python bench/augmentation.py [--seeds 5] [--fractions 0.05,0.1] [--tta 8]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

METHODS = {"none": {}, "augment light": {"augment": "light"}, "mixup 0.2": {"mixup": 0.2}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fractions", default="0.05,0.1")
    parser.add_argument("--tta", type=int, default=8)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--head-epochs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    import transferkit as tk

    work = Path(tempfile.mkdtemp(prefix="tk-bench-augment-"))
    fractions = [float(f) for f in args.fractions.split(",")]
    scores: dict[tuple[str, float, str], list[float]] = {}
    head_seconds: dict[str, list[float]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        encoder = tk.pretrain(data="digits", seed=seed, epochs=args.pretrain_epochs, out=str(work / f"enc{seed}"),
                              verbose=False).artifact
        for fraction in fractions:
            line = []
            for name, settings in METHODS.items():
                out = work / f"clf-{seed}-{fraction}-{name.replace(' ', '-')}"
                result = tk.finetune(from_=str(encoder), label_fraction=fraction, seed=seed, lr=args.lr,
                                     head_epochs=args.head_epochs, epochs=args.epochs, out=str(out), verbose=False,
                                     **settings)
                head_seconds.setdefault(name, []).append(result.manifest["stages"][0]["seconds"])
                evaluation = tk.evaluate(out, tta=args.tta, verbose=False)
                for kind, key in (("plain", "accuracy"), (f"tta {args.tta}", "tta_accuracy")):
                    scores.setdefault((name, fraction, kind), []).append(evaluation.metrics[key])
                line.append(f"{name} {evaluation.metrics['accuracy']:.3f} (tta {evaluation.metrics['tta_accuracy']:.3f})")
            print(f"seed {seed}, {fraction:g} labels: " + ", ".join(line), flush=True)
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f} s; test accuracy, mean +- std\n")
    print("| training | " + " | ".join(f"{f:g} labels: plain | tta {args.tta}" for f in fractions) + " |")
    print("|---|" + "---:|---:|" * len(fractions))
    for name in METHODS:
        cells = []
        for fraction in fractions:
            for kind in ("plain", f"tta {args.tta}"):
                values = np.array(scores[(name, fraction, kind)])
                cells.append(f"{values.mean():.3f} +- {values.std():.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nhead stage seconds (mean): " + ", ".join(
        f"{name} {np.mean(values):.1f}" for name, values in head_seconds.items()))


if __name__ == "__main__":
    main()
