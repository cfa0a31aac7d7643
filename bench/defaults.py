"""Do the defaults train well? Default runs against the tuned flags of the benches, and LogisticRegression.

For each seed, on the digits (the default split: 20% test, 10% validation):
- `defaults`: `pretrain --data digits`, then `finetune --from it --label-fraction F`, nothing else;
- `defaults + propagate`: the same with `--semi-supervised propagate`;
- `tuned`: bench/scarce_labels.py's flags (denoising encoder of 30 epochs at batch 32; head 200 epochs,
  unfreezing stage 100 epochs of every block, lr 0.01, a tenth of it to unfreeze, early stopping in head
  stages only), and `tuned + propagate` (its README row: `--propagate-on inputs`);
- `LogisticRegression` on the same labeled examples (pixels scaled to [0, 1]);
and a VGG16 with random weights (`--backbone vgg16 --weights none`) on a folder of the digits as 32x32 RGB
PNGs at 5% labels: defaults against `--head-epochs 200 --lr 0.01` over the settings that were the defaults
before (epochs 10, batch 64, head only, head patience 20). Prints mean ± std test accuracy and the mean
wall time of each default run (in-process, after TensorFlow's import).

    python bench/defaults.py                       # 5 seeds, 1/5/10%, and the VGG16 folder
    python bench/defaults.py --seeds 1 --no-vgg    # a quick look
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, str(Path(__file__).parent))

from scarce_labels import PRETRAIN, TASK_SETTINGS  # noqa: E402

TUNED_FINETUNE = dict(head_epochs=200, epochs=100, unfreeze_top=3, lr=0.01, finetune_lr_factor=0.1, batch_size=32,
                      patience=0, head_patience=20, dropout=0.0)
OLD_DEFAULTS = dict(epochs=10, batch_size=64, unfreeze_top=0, patience=0, head_patience=20, dropout=0.0)  # before issue 15
TUNED_VGG = dict(OLD_DEFAULTS, head_epochs=200, lr=0.01)


def logistic_score(data, split) -> float:
    from sklearn.linear_model import LogisticRegression

    from transferkit.data.sources import as_array

    lo, hi = data.value_range
    x = as_array(data.x)  # a folder streams: decode it here (1,797 small images)
    x = (x.reshape(len(x), -1) - lo) / (hi - lo)
    model = LogisticRegression(max_iter=5000).fit(x[split.labeled], data.y[split.labeled])
    return float(model.score(x[split.test], data.y[split.test]))


def timed(fn, **kwargs) -> tuple[float, float]:
    """Test accuracy (NaN when the run diverged: its stop is counted, not hidden) and wall seconds."""
    from transferkit.errors import TransferkitError

    started = time.perf_counter()
    try:
        result = fn(verbose=False, restart=True, **kwargs)
    except TransferkitError as err:
        print(f"  diverged: {err}", flush=True)
        return float("nan"), time.perf_counter() - started
    return result.metrics.get("test_accuracy", float("nan")), time.perf_counter() - started


def digits_folder(root: Path) -> Path:
    """The digits as 32x32 RGB PNGs, one sub-folder per class (written once)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = root / "digits-png"
    if not folder.is_dir():
        digits = load_digits()
        for i, (image, label) in enumerate(zip(digits.images, digits.target)):
            (folder / str(label)).mkdir(parents=True, exist_ok=True)
            pixels = (image * 255 / 16).astype("uint8")
            Image.fromarray(pixels).resize((32, 32), Image.BILINEAR).convert("RGB").save(folder / str(label) / f"{i}.png")
    return folder


def run_seed(seed: int, options: dict) -> dict:
    import transferkit as tk
    from transferkit.data.sources import load_data, split_data

    work = Path(options["work"]) / f"seed{seed}"
    data = load_data("digits")
    scores: dict[str, dict[str, float]] = {}
    seconds: dict[str, list[float]] = {}

    def record(name: str, column: str, value: tuple[float, float], timed_run: bool = False) -> None:
        scores.setdefault(name, {})[column] = value[0]
        if timed_run:
            seconds.setdefault(name, []).append(value[1])

    default_encoder, tuned_encoder = work / "encoder-default", work / "encoder-tuned"
    if not options["digits"]:
        options = {**options, "fractions": []}
    if options["digits"]:
        record("pretrain (defaults)", "pretrain", timed(tk.pretrain, data="digits", seed=seed,
                                                        out=str(default_encoder)), True)
        if options["tuned"]:
            tk.pretrain(data="digits", seed=seed, out=str(tuned_encoder), verbose=False,
                        **{**PRETRAIN, "task": "denoising", **TASK_SETTINGS["denoising"]})
    for fraction in options["fractions"]:
        column = f"{fraction:g}"
        split = split_data(data, seed=seed, label_fraction=fraction, label_seed=seed)
        scores.setdefault("LogisticRegression", {})[column] = logistic_score(data, split)
        common = dict(label_fraction=fraction, seed=seed, out=str(work / "classifier"))
        record("defaults", column, timed(tk.finetune, from_=str(default_encoder), **common), True)
        record("defaults + propagate", column, timed(tk.finetune, from_=str(default_encoder),
                                                     semi_supervised="propagate", **common), True)
        if options["tuned"]:
            record("tuned", column, timed(tk.finetune, from_=str(tuned_encoder), **TUNED_FINETUNE, **common))
            record("tuned + propagate", column, timed(tk.finetune, from_=str(tuned_encoder), **TUNED_FINETUNE,
                                                      semi_supervised="propagate", propagate_on="inputs", **common))
        print(f"  seed {seed}, {fraction:g}: " + ", ".join(f"{n} {s[column]:.3f}" for n, s in scores.items()
                                                            if column in s), flush=True)
    if options["vgg"]:
        folder = Path(options["folder"])
        common = dict(backbone="vgg16", weights="none", data=f"dir:{folder}", label_fraction=0.05, seed=seed,
                      out=str(work / "vgg"))
        record("vgg16 defaults", "0.05", timed(tk.finetune, **common), True)
        record("vgg16 tuned", "0.05", timed(tk.finetune, **common, **TUNED_VGG))
        folder_data = load_data(f"dir:{folder}")
        split = split_data(folder_data, seed=seed, label_fraction=0.05, label_seed=seed)
        scores.setdefault("vgg16 LogisticRegression", {})["0.05"] = logistic_score(folder_data, split)
        print(f"  seed {seed}, vgg16: " + ", ".join(f"{n} {s['0.05']:.3f}" for n, s in scores.items()
                                                    if n.startswith("vgg16")), flush=True)
    return {"scores": scores, "seconds": seconds}


def _one_thread() -> None:
    os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--fractions", default="0.01,0.05,0.1")
    parser.add_argument("--no-vgg", dest="vgg", action="store_false", help="Skip the VGG16 folder runs.")
    parser.add_argument("--no-digits", dest="digits", action="store_false", help="Only the VGG16 folder runs.")
    parser.add_argument("--no-digits-tuned", dest="tuned", action="store_false",
                        help="Skip the tuned digits rows (they do not depend on the defaults).")
    parser.add_argument("--first-seed", type=int, default=0, help="Seeds first-seed..first-seed+seeds-1.")
    parser.add_argument("--jobs", type=int, default=1, help="Seeds run in parallel processes (one thread each).")
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tk-defaults-"))
    options = {"fractions": [float(f) for f in args.fractions.split(",")], "work": str(work), "vgg": args.vgg,
               "digits": args.digits, "tuned": args.tuned,
               "folder": str(digits_folder(work)) if args.vgg else None}
    started = time.perf_counter()
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            per_seed = list(pool.map(run_seed, seeds, [options] * len(seeds)))
    else:
        per_seed = [run_seed(seed, options) for seed in seeds]
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f}s; test accuracy, mean ± std "
          f"(default split: 20% test, 10% validation):\n")
    columns = [f"{f:g}" for f in options["fractions"]] if args.digits else ["0.05"]
    print("| method | " + " | ".join(f"{float(c):.0%} labels" for c in columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name in dict.fromkeys(n for s in per_seed for n in s["scores"]):
        cells = []
        for column in columns:
            found = [s["scores"][name][column] for s in per_seed if column in s["scores"].get(name, {})]
            values = [v for v in found if v == v]  # a diverged run is NaN
            diverged = f" ({len(found) - len(values)} diverged)" if len(values) < len(found) else ""
            cells.append(f"{statistics.mean(values):.3f} ± {statistics.stdev(values) if len(values) > 1 else 0:.3f}"
                         f"{diverged}" if values else ("all diverged" if found else ""))
        if any(cells):
            print(f"| {name} | " + " | ".join(cells) + " |")
    print("\nwall time of each default run, mean (max) seconds:")
    for name in dict.fromkeys(n for s in per_seed for n in s["seconds"]):
        values = [t for s in per_seed for t in s["seconds"].get(name, [])]
        print(f"  {name}: {statistics.mean(values):.1f} ({max(values):.1f})")


if __name__ == "__main__":
    sys.exit(main())
