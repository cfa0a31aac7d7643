"""Class weights on imbalanced data: `finetune` with and without `--class-weight balanced`.

The digits with classes 0-4 kept at 10% of their examples (the rest of them
left out), an encoder pretrained per seed on that data, then `finetune` on all
its labels with each setting. Scored on examples no run has seen: the data's
own test split (20%, as imbalanced as training) plus the left-out 90% of
classes 0-4 (so the minority recall rests on ~800 examples, not ~35):
balanced accuracy, minority-class recall (mean over 0-4) and accuracy.

    python bench/imbalance.py [--seeds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MINORITY = (0, 1, 2, 3, 4)
KEEP = 0.1


def imbalanced_digits(seed: int, folder: Path) -> tuple[str, np.ndarray, np.ndarray]:
    """An npz of the digits with classes 0-4 at 10%; and the left-out examples (x, y)."""
    from transferkit.data.sources import load_data

    data = load_data("digits")
    rng = np.random.default_rng(seed)
    keep = np.ones(len(data.y), bool)
    for c in MINORITY:
        rows = np.flatnonzero(data.y == c)
        keep[rng.permutation(rows)[int(round(KEEP * len(rows))):]] = False
    np.savez(folder / f"imbalanced{seed}.npz", x=data.x[keep], y=data.y[keep])
    return f"npz:{folder}/imbalanced{seed}.npz", data.x[~keep], data.y[~keep]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--pretrain-epochs", type=int, default=20)
    parser.add_argument("--head-epochs", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.01)
    args = parser.parse_args()

    import transferkit as tk
    from sklearn.metrics import balanced_accuracy_score, recall_score

    work = Path(tempfile.mkdtemp(prefix="tk-bench-imbalance-"))
    scores: dict[str, dict[str, list[float]]] = {}
    started = time.perf_counter()
    for seed in range(args.seeds):
        spec, left_x, left_y = imbalanced_digits(seed, work)
        encoder = tk.pretrain(data=spec, seed=seed, epochs=args.pretrain_epochs, out=str(work / f"enc{seed}"),
                              verbose=False).artifact
        for setting in ("none", "balanced"):
            out = work / f"clf-{seed}-{setting}"
            tk.finetune(from_=str(encoder), data=spec, seed=seed, class_weight=setting, lr=args.lr,
                        head_epochs=args.head_epochs, epochs=args.epochs, out=str(out), verbose=False)
            data = tk.load_data(spec)
            test = np.asarray(json.loads((out / "split.json").read_text())["test"])
            x = np.concatenate([data.x[test], left_x])
            y = np.concatenate([data.y[test], left_y])
            predicted = tk.load_model(out).predict(x, verbose=0).argmax(axis=1)
            found = {"balanced accuracy": balanced_accuracy_score(y, predicted),
                     "minority recall (0-4)": float(np.mean(recall_score(y, predicted, labels=list(MINORITY),
                                                                         average=None))),
                     "accuracy": float(np.mean(predicted == y))}
            for key, value in found.items():
                scores.setdefault(setting, {}).setdefault(key, []).append(value)
            print(f"seed {seed}, class_weight {setting}: " + ", ".join(f"{k} {v:.3f}" for k, v in found.items()),
                  flush=True)
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f} s; mean +- std on "
          f"{len(y)} held-out examples ({int(np.isin(y, MINORITY).sum())} of classes 0-4)\n")
    keys = list(next(iter(scores.values())))
    print("| --class-weight | " + " | ".join(keys) + " |")
    print("|---|" + "---:|" * len(keys))
    for setting, found in scores.items():
        print(f"| {setting} | " + " | ".join(f"{np.mean(found[k]):.3f} +- {np.std(found[k]):.3f}" for k in keys)
              + " |")


if __name__ == "__main__":
    main()
