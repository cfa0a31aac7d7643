"""Epochs to a target accuracy: 1cycle against a constant learning rate, fine-tuning on digits.

For each seed, a constant-rate fine-tune (every block unfrozen) runs N epochs;
its test accuracy is the target. 1cycle (fastai's cosine, same peak rate) then
(peak `--onecycle-lr`, by default the constant rate) runs M = 1, 2, ... N
epochs, each a whole cycle, and the smallest M whose
accuracy reaches the target is its epochs-to-target.

    python bench/onecycle.py [--epochs 20] [--seeds 3] [--lr 0.003] [--onecycle-lr 0.01] [--label-fraction 0.5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--lr", type=float, default=0.003, help="the constant rate")
    parser.add_argument("--onecycle-lr", type=float, default=None, help="1cycle's peak rate (default: --lr)")
    parser.add_argument("--label-fraction", type=float, default=0.5)
    args = parser.parse_args()

    import transferkit as tk

    work = tempfile.mkdtemp(prefix="tk-bench-1cycle-")
    encoder = tk.pretrain(epochs=10, out=f"{work}/enc", verbose=False).artifact

    def accuracy(schedule: str, epochs: int, seed: int) -> float:
        lr = (args.onecycle_lr or args.lr) if schedule == "onecycle" else args.lr
        # finetune_lr_factor 1: every block trains at the rate given (an unfreezing stage takes lr x the factor)
        return tk.finetune(from_=str(encoder), unfreeze_schedule=f"all:{epochs}", schedule=schedule, lr=lr,
                           finetune_lr_factor=1.0, label_fraction=args.label_fraction, seed=seed,
                           out=f"{work}/clf", verbose=False).metrics["test_accuracy"]

    rows = []
    for seed in range(args.seeds):
        target = accuracy("constant", args.epochs, seed)
        reached = next((m for m in range(1, args.epochs + 1) if accuracy("onecycle", m, seed) >= target), None)
        rows.append((seed, target, reached))
        print(f"seed {seed}: constant {args.epochs} epochs -> {target:.4f}; 1cycle reaches it in "
              f"{reached if reached else f'more than {args.epochs}'} epochs", flush=True)
    done = [r for _, _, r in rows if r]
    print(f"\n| seed | constant lr, {args.epochs} epochs: test accuracy | 1cycle: epochs to reach it |")
    print("|---|---|---|")
    for seed, target, reached in rows:
        print(f"| {seed} | {target:.4f} | {reached or f'> {args.epochs}'} |")
    if done:
        print(f"\n1cycle needs {statistics.mean(done):.1f} epochs on average ({len(done)} of {len(rows)} seeds) "
              f"for what the constant rate reaches in {args.epochs}.")


if __name__ == "__main__":
    main()
