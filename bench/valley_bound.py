"""Where fastai's `valley` lands against the largest stable rate of SGD, on linear regression.

For MSE on a linear model the Hessian is H = 2 XᵀX / n and plain gradient
descent diverges above 2 / λmax(H). The sweep trains one batch per rate and
rates grow by r = (end/start)^(1/num_steps) a step, so by the rate `lr` the
steps taken add up to about lr · S with S = 1 / (1 - 1/r) (S ≈ 5.9 for 100
steps over 8 decades). The loss along an eigen-direction of curvature λ falls
like exp(-2 λ · lr · S), so it falls near lr ≈ 1 / (2 λ S) = bound / (4 S) for
the top direction: fastai's valley, half-way down the longest descent, sits
there or lower. The table prints bound / valley and bound / (4 S).

    python bench/valley_bound.py [--seeds 6] [--num-steps 100]
"""

from __future__ import annotations

import argparse
import os
import statistics

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

PROBLEMS = {  # name: (per-feature scales, true weights); most loss in the top direction ... none of it
    "4 features, scales 2/1/0.5/0.25": ([2, 1, 0.5, 0.25], None),
    "8 features, isotropic": ([1] * 8, None),
    "spike 5x, true weight 0 on it": ([5] + [1] * 7, [0] + [1] * 7),
}


def ratio(scales, weights, batch_size: int, num_steps: int, seed: int) -> float:
    import keras
    import numpy as np

    from transferkit.pieces.lr_finder import lr_find

    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((1024, len(scales))) * np.array(scales)).astype("float32")
    w = rng.standard_normal(len(scales)) if weights is None else np.array(weights, dtype=float)
    y = (x @ w[:, None] + 0.1 * rng.standard_normal((1024, 1))).astype("float32")
    bound = 2 / np.linalg.eigvalsh(2 * x.T @ x / len(x)).max()
    model = keras.Sequential([keras.Input((len(scales),)),
                              keras.layers.Dense(1, use_bias=False, kernel_initializer="zeros")])
    model.compile(keras.optimizers.SGD(), "mse")
    return float(bound / lr_find(model, (x, y), batch_size=batch_size, num_steps=num_steps).valley)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=6)
    parser.add_argument("--num-steps", type=int, default=100)
    args = parser.parse_args()
    step = (10.0 / 1e-7) ** (1 / args.num_steps)
    predicted = 4 / (1 - 1 / step)
    print(f"num_steps={args.num_steps}: bound / (4 S) predicts the top direction's descent at bound / {predicted:.0f}")
    print(f"{'problem':34} {'batch':>5}  bound / valley over {args.seeds} seeds (mean, min-max)")
    for name, (scales, weights) in PROBLEMS.items():
        for batch_size in (32, 128):
            ratios = [ratio(scales, weights, batch_size, args.num_steps, seed) for seed in range(args.seeds)]
            print(f"{name:34} {batch_size:>5}  {statistics.mean(ratios):6.1f}  ({min(ratios):.1f}-{max(ratios):.1f})",
                  flush=True)


if __name__ == "__main__":
    main()
