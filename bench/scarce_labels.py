"""Does pretraining on unlabeled digits pay when labels are scarce?

For each seed, the digits are split 80/20 (stratified; no validation part),
every pretraining task trains an encoder on the 80% without labels, and each
encoder is fine-tuned on a fraction of the labels (stratified, at least one per
class) and tested on the 20%. Against: the same architecture trained from
scratch on the same labels (an untrained encoder, every block unfrozen), and
what a user could pick instead: scikit-learn's LogisticRegression on the
labeled examples and LabelSpreading on labeled + unlabeled ones (pixels scaled
to [0, 1]; the rbf kernel with its default γ=20, and kNN with 7 neighbours).
With --semi, the networks of --semi-tasks are also fine-tuned with
`--semi-supervised pseudo` and `propagate` on the unlabeled rest of the pool.
Prints mean ± std test accuracy.

    python bench/scarce_labels.py                                  # 5 seeds, 1/5/10%, every task
    python bench/scarce_labels.py --seeds 2 --tasks denoising,pairs --fractions 0.01,0.05
    python bench/scarce_labels.py --tasks denoising --semi pseudo,propagate --semi-tasks scratch,denoising

Encoders are kept in --work (default: a temporary folder), so a second run with
the same --work and other fine-tuning flags does not pretrain again.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

TASKS = ("autoencoder", "denoising", "stacked", "rotation", "pairs", "gan")
# Pretraining settings per task, over the shared ones (the recipe's defaults otherwise).
PRETRAIN = {"batch_size": 32, "units": (128, 64, 32), "activation": "selu", "lr": 1e-3}
TASK_SETTINGS = {
    "autoencoder": {"epochs": 30},
    "denoising": {"epochs": 30, "noise": 0.3, "noise_kind": "gaussian"},
    "stacked": {"epochs": 10},            # per block: 30 epochs in all
    "rotation": {"epochs": 8},            # 4 rotations of each input per epoch
    "pairs": {"epochs": 60, "batch_size": 128, "lr": 3e-3},
    "gan": {"epochs": 30, "lr": 2e-4},
}


def sklearn_baselines(data, split) -> dict[str, float]:
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.semi_supervised import LabelSpreading

    lo, hi = data.value_range
    x = (data.x.reshape(len(data.x), -1) - lo) / (hi - lo)
    y_test = data.y[split.test]
    logistic = LogisticRegression(max_iter=5000).fit(x[split.labeled], data.y[split.labeled])
    partial = np.full(len(split.train), -1)
    partial[np.searchsorted(split.train, split.labeled)] = data.y[split.labeled]
    rbf = LabelSpreading(max_iter=1000).fit(x[split.train], partial)
    knn = LabelSpreading(kernel="knn", n_neighbors=7, max_iter=1000).fit(x[split.train], partial)
    return {"LogisticRegression": float(logistic.score(x[split.test], y_test)),
            "LabelSpreading rbf": float(rbf.score(x[split.test], y_test)),
            "LabelSpreading knn": float(knn.score(x[split.test], y_test))}


def pretrain_all(tasks: list[str], seed: int, work: Path, overrides: dict) -> dict[str, Path]:
    """An encoder per task (and the untrained one, `scratch`), pretrained once per seed and kept in `work`."""
    import transferkit as tk

    encoders = {}
    for task in ["scratch", *tasks]:
        out = work / f"{task}-seed{seed}"
        settings = {**PRETRAIN, **({"task": "autoencoder", "epochs": 0} if task == "scratch" else
                                   {"task": task, **TASK_SETTINGS[task]}), **overrides.get(task, {})}
        if not (out / "manifest.json").exists():
            started = time.perf_counter()
            tk.pretrain(data="digits", seed=seed, test_fraction=0.2, val_fraction=0.0, out=str(out),
                        verbose=False, **settings)
            print(f"  pretrained {task} (seed {seed}) in {time.perf_counter() - started:.0f}s", flush=True)
        encoders[task] = out
    return encoders


def finetune_score(encoder: Path, fraction: float, seed: int, settings: dict, work: Path) -> float:
    import transferkit as tk

    result = tk.finetune(from_=str(encoder), label_fraction=fraction, seed=seed, test_fraction=0.2, val_fraction=0.0,
                         out=str(work / f"classifier-seed{seed}"), verbose=False, **settings)
    return result.metrics["test_accuracy"]


def run_seed(seed: int, options: dict) -> dict[str, dict[float, float]]:
    """Every method's test accuracy at every label fraction, for one seed."""
    from transferkit.data.sources import load_data, split_data

    data, work = load_data("digits"), Path(options["work"])
    encoders = pretrain_all(options["tasks"], seed, work, options["pretrain"])
    scores: dict[str, dict[float, float]] = {}
    for fraction in options["fractions"]:
        split = split_data(data, seed=seed, test_fraction=0.2, val_fraction=0.0, label_fraction=fraction,
                           label_seed=seed)
        found = {**sklearn_baselines(data, split),
                 "scratch": finetune_score(encoders["scratch"], fraction, seed, options["scratch"], work)}
        for task in options["tasks"]:
            found[task] = finetune_score(encoders[task], fraction, seed, options["finetune"], work)
        for task in options["semi_tasks"]:
            for mode in options["semi"]:
                settings = {**options["scratch" if task == "scratch" else "finetune"], "semi_supervised": mode,
                            **(options["propagate"] if mode == "propagate" else {})}
                found[f"{task} + {mode}"] = finetune_score(encoders[task], fraction, seed, settings, work)
        for name, score in found.items():
            scores.setdefault(name, {})[fraction] = score
        line = ", ".join(f"{name} {score:.3f}" for name, score in found.items())
        print(f"  seed {seed}, {fraction:g} labels ({len(split.labeled)}): {line}", flush=True)
    return scores


def _one_thread() -> None:
    """Worker processes: one TensorFlow thread each, so --jobs N uses N cores."""
    os.environ["TF_NUM_INTRAOP_THREADS"] = os.environ["TF_NUM_INTEROP_THREADS"] = "1"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5, help="Seeds 0..N-1: split, labels, initialization.")
    parser.add_argument("--fractions", default="0.01,0.05,0.1", help="Label fractions of the training pool.")
    parser.add_argument("--tasks", default=",".join(TASKS), help="Pretraining tasks to compare.")
    parser.add_argument("--head-epochs", type=int, default=200)
    parser.add_argument("--epochs", type=int, default=100, help="Epochs of the unfreezing stage.")
    parser.add_argument("--unfreeze-top", type=int, default=3)
    parser.add_argument("--lr", default="0.01", help="Fine-tuning learning rate of the head stage (or auto).")
    parser.add_argument("--finetune-lr-factor", type=float, default=0.1)
    parser.add_argument("--scratch-epochs", type=int, default=200, help="Epochs of the from-scratch model.")
    parser.add_argument("--scratch-lr", type=float, default=0.003)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--pretrain", default="{}", help='JSON of per-task pretraining overrides, e.g. '
                                                         '\'{"pairs": {"epochs": 100}}\'.')
    parser.add_argument("--semi", default="", help="Semi-supervised modes to add as rows: pseudo,propagate.")
    parser.add_argument("--semi-tasks", default="scratch,denoising", help="The networks the --semi rows fine-tune.")
    parser.add_argument("--propagate-on", default="features", choices=["features", "inputs"])
    parser.add_argument("--jobs", type=int, default=1, help="Seeds run in parallel processes.")
    parser.add_argument("--work", type=Path, default=None, help="Folder for encoders (kept between runs).")
    parser.add_argument("--json", type=Path, default=None, help="Also write every score to this JSON file.")
    args = parser.parse_args()

    fractions = [float(f) for f in args.fractions.split(",")]
    tasks = [t for t in args.tasks.split(",") if t]
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task {unknown[0]!r}; expected some of {', '.join(TASKS)}")
    work = args.work or Path(tempfile.mkdtemp(prefix="tk-scarce-"))
    work.mkdir(parents=True, exist_ok=True)
    options = {
        "semi": [m for m in args.semi.split(",") if m],
        "semi_tasks": [t for t in args.semi_tasks.split(",") if t and (t == "scratch" or t in tasks)],
        "propagate": {"propagate_on": args.propagate_on},
        "tasks": tasks, "fractions": fractions, "work": str(work), "pretrain": json.loads(args.pretrain),
        "finetune": dict(head_epochs=args.head_epochs, epochs=args.epochs, unfreeze_top=args.unfreeze_top,
                         lr=args.lr if args.lr == "auto" else float(args.lr),
                         finetune_lr_factor=args.finetune_lr_factor, batch_size=args.batch_size),
        "scratch": dict(head_epochs=0, epochs=args.scratch_epochs, unfreeze_top=len(PRETRAIN["units"]),
                        lr=args.scratch_lr, finetune_lr_factor=1.0, batch_size=args.batch_size),
    }
    print(f"scarce_labels: seeds 0-{args.seeds - 1}, fractions {fractions}, tasks {tasks}; work {work}\n"
          f"  fine-tuning {options['finetune']}\n  scratch {options['scratch']}", flush=True)
    started = time.perf_counter()
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_thread) as pool:
            per_seed = list(pool.map(run_seed, range(args.seeds), [options] * args.seeds))
    else:
        per_seed = [run_seed(seed, options) for seed in range(args.seeds)]
    scores = {name: {f: [s[name][f] for s in per_seed] for f in fractions} for name in per_seed[0]}
    pool_size = round(0.8 * 1797)
    print(f"\n{args.seeds} seeds, {time.perf_counter() - started:.0f}s; test accuracy, mean ± std:\n")
    print(table(scores, fractions, pool_size))
    if args.json:
        args.json.write_text(json.dumps({r: {str(f): v for f, v in s.items()} for r, s in scores.items()}, indent=1))


def table(scores: dict[str, dict[float, list[float]]], fractions: list[float], pool: int) -> str:
    header = "| method | " + " | ".join(f"{f:.0%} labels (~{round(f * pool)})" for f in fractions) + " |"
    lines = [header, "|" + "---|" * (len(fractions) + 1)]
    for name, by_fraction in scores.items():
        cells = []
        for f in fractions:
            values = by_fraction[f]
            std = statistics.stdev(values) if len(values) > 1 else 0.0
            cells.append(f"{statistics.mean(values):.3f} ± {std:.3f}")
        plain = name.startswith(("LogisticRegression", "LabelSpreading", "scratch"))
        label = name if plain else f"pretrain {name}"
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
