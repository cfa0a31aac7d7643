"""The chapter's transfer experiment, on the digits: reuse a model of 8 digits for the other two.

Model A learns the 8 digits other than `--pair` (every label, from scratch).
Model B tells the two remaining digits apart from `--per-class` labels of each:
once on A's layers (A's classifier base saved as an encoder artifact, then
`finetune --from` it: the new head first with A's layers frozen, then the top
`--unfreeze-top` blocks at the default factor of the rate, 0.03), and once from scratch (the same
architecture, untrained, every block trained). Both are tested on the same
held-out 20% of the two digits; the data reach transferkit as npz files in a
temporary folder. Prints mean ± std accuracy over the seeds and the error-rate
ratio.

    python bench/transfer_digits.py                        # 5 seeds, digits 3 vs 8, 20 labels per class
    python bench/transfer_digits.py --pair 4,9 --per-class 5 --seeds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ARCH = {"units": (128, 64, 32), "activation": "selu", "batch_size": 32}


def write_data(folder: Path, pair: tuple[int, int]) -> tuple[str, str]:
    """npz specs of the 8 other digits (labels 0-7) and of the pair (labels 0 and 1)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    x, y = digits.images.astype("float32"), digits.target
    in_pair = np.isin(y, pair)
    others = sorted(set(range(10)) - set(pair))
    np.savez(folder / "eight.npz", x=x[~in_pair], y=np.searchsorted(others, y[~in_pair]))
    np.savez(folder / "pair.npz", x=x[in_pair], y=(y[in_pair] == pair[1]).astype("int64"))
    return f"npz:{folder / 'eight.npz'}", f"npz:{folder / 'pair.npz'}"


def encoder_from_classifier(classifier: Path, untrained_encoder: Path, out: Path) -> Path:
    """An encoder artifact holding the trained base of `classifier` (the rest from `untrained_encoder`)."""
    import keras

    from transferkit.store import artifacts

    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(untrained_encoder, out)
    base = keras.saving.load_model(classifier / artifacts.MODEL).get_layer("encoder")
    base.save(out / artifacts.MODEL)
    manifest = artifacts.read_manifest(out, ("encoder",))
    artifacts.write_manifest(out, dataclasses.replace(manifest, task="supervised",
                                                      extra={**manifest.extra, "trained_on": str(classifier)}))
    return out


def label_fraction_for(spec: str, per_class: int, seed: int) -> float:
    """The label fraction that keeps `per_class` labels of each class of the training split."""
    from transferkit.data.sources import load_data, split_data

    data = load_data(spec)
    train = split_data(data, seed=seed, test_fraction=0.2, val_fraction=0.0).train
    return min(1.0, data.num_classes * per_class / len(train))


def run_seed(seed: int, args: argparse.Namespace, work: Path, specs: tuple[str, str]) -> dict[str, float]:
    import transferkit as tk

    eight, pair = specs
    common = dict(seed=seed, test_fraction=0.2, val_fraction=0.0, verbose=False, **ARCH)
    untrained_a = tk.pretrain(data=eight, epochs=0, out=str(work / f"a-untrained-{seed}"), **common).artifact
    model_a = tk.finetune(from_=str(untrained_a), head_epochs=0, epochs=args.a_epochs, unfreeze_top=3, lr=0.003,
                          finetune_lr_factor=1.0, out=str(work / f"a-{seed}"), **common)
    untrained_b = tk.pretrain(data=pair, epochs=0, out=str(work / f"b-untrained-{seed}"), **common).artifact
    reused = encoder_from_classifier(model_a.artifact, untrained_b, work / f"a-encoder-{seed}")
    fraction = label_fraction_for(pair, args.per_class, seed)
    b_on_a = tk.finetune(from_=str(reused), data=pair, label_fraction=fraction, head_epochs=args.head_epochs,
                         epochs=args.epochs, unfreeze_top=args.unfreeze_top, lr=args.lr,
                         out=str(work / f"b-on-a-{seed}"), **common)
    b_scratch = tk.finetune(from_=str(untrained_b), data=pair, label_fraction=fraction, head_epochs=0,
                            epochs=args.scratch_epochs, unfreeze_top=3, lr=args.scratch_lr, finetune_lr_factor=1.0,
                            out=str(work / f"b-scratch-{seed}"), **common)
    scores = {"model A (8 digits)": model_a.metrics["test_accuracy"],
              "B on A's layers": b_on_a.metrics["test_accuracy"],
              "B from scratch": b_scratch.metrics["test_accuracy"]}
    print(f"  seed {seed}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()), flush=True)
    return scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pair", default="3,8", help="The two digits of task B; A learns the other 8.")
    parser.add_argument("--per-class", type=int, default=20, help="Labels of each digit for task B.")
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--a-epochs", type=int, default=30)
    parser.add_argument("--head-epochs", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--unfreeze-top", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--scratch-epochs", type=int, default=200)
    parser.add_argument("--scratch-lr", type=float, default=0.003)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    pair = tuple(int(d) for d in args.pair.split(","))
    if len(pair) != 2 or len(set(pair)) != 2 or not all(0 <= d <= 9 for d in pair):
        parser.error(f"--pair takes two different digits such as 3,8. Received: --pair {args.pair}")

    work = Path(tempfile.mkdtemp(prefix="tk-transfer-"))
    specs = write_data(work, pair)
    print(f"transfer_digits: A on the 8 digits other than {pair}, B = {pair[0]} vs {pair[1]} with {args.per_class} "
          f"labels per digit; seeds 0-{args.seeds - 1}", flush=True)
    started = time.perf_counter()
    runs = [run_seed(seed, args, work, specs) for seed in range(args.seeds)]
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f}s; test accuracy, mean ± std:\n")
    print("| model | test accuracy | error rate |\n|---|---|---|")
    for name in runs[0]:
        values = [r[name] for r in runs]
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        print(f"| {name} | {statistics.mean(values):.4f} ± {std:.4f} | {1 - statistics.mean(values):.4f} |")
    errors = {k: 1 - statistics.mean(r[k] for r in runs) for k in ("B on A's layers", "B from scratch")}
    reused, scratch = errors["B on A's layers"], errors["B from scratch"]
    if reused > 0:
        print(f"\nerror rate from scratch / on A's layers: {scratch / reused:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
