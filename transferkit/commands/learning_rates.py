"""The learning-rate commands: `lr-find` on a recipe's model, and `schedule --plot` without training.

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.commands.learning_rates import schedule_curve
>>> curve = schedule_curve(Recipe(from_="saved_models/digits-encoder"))    # doctest: +SKIP
>>> curve.lrs.max()                                                         # doctest: +SKIP
0.001
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from transferkit.training import runs
from transferkit.pieces.optimizers import make_optimizer
from transferkit.training.runner import learning_rate_data, schedule_options
from transferkit.training.runtime import training_context
from transferkit.errors import SettingsError
from transferkit.data.progress import quiet
from transferkit.recipe import Recipe

LOSS = "sparse_categorical_crossentropy"


def run_lr_find(recipe: Recipe, stage: str | None = None, plot: str | Path | None = None,
                start_lr: float = 1e-7, end_lr: float = 10.0, num_steps: int = 100, verbose: bool = True):
    """The LR range test on the recipe's classifier, frozen as in `stage` (default: the first stage)."""
    from transferkit.pieces.freezing import freeze_all_but_top
    from transferkit.finetuning.plan import plan_finetune
    from transferkit.pieces.lr_finder import check_plot_folder, check_lr_find_settings, lr_find

    check_lr_find_settings(start_lr, end_lr, num_steps, 0.98, 4.0, recipe.batch_size)
    if plot is not None:
        check_plot_folder(Path(plot))
    with quiet(not verbose), training_context(recipe) as strategy:
        plan = plan_finetune(recipe, strategy.num_replicas_in_sync)
        chosen = _stage(plan.stages, stage)
        freeze_all_but_top(plan.clf.base, plan.clf.blocks, chosen.top, recipe.train_batchnorm)
        plan.clf.model.compile(optimizer=make_optimizer(recipe, start_lr), loss=LOSS)
        x, y = plan.labeled
        result = lr_find(plan.clf.model, learning_rate_data(x, y, plan.batch_size), start_lr=start_lr, end_lr=end_lr, num_steps=num_steps,
                         batch_size=plan.batch_size, plot=plot)
    runs.print_line(f"stage {chosen.name} of {plan.clf.info['description']}\n{result.summary()}"
                    + (f"\nplot written to {plot}" if plot else ""), verbose)
    return result


def _stage(stages, name: str | None):
    if not stages:
        raise SettingsError("The recipe has no training stage (every stage has 0 epochs).")
    if name is None:
        return stages[0]
    for stage in stages:
        if stage.name == name:
            return stage
    raise SettingsError(f"No stage named {name!r}; the recipe's stages are {', '.join(s.name for s in stages)}.")


@dataclasses.dataclass(frozen=True)
class ScheduleCurve:
    """Learning rate (and momentum, where the schedule cycles it) at every optimizer step, and where stages begin."""

    lrs: np.ndarray
    momenta: np.ndarray | None
    stage_starts: list[tuple[int, str]]


def schedule_curve(recipe: Recipe, command: str = "finetune") -> ScheduleCurve:
    """The rates a `pretrain` or `finetune` run of `recipe` would use, step by step, without training."""
    from transferkit.pieces.momentum import OneCycleMomentum
    from transferkit.pieces.schedules import OneCycle, make_schedule

    if recipe.lr == "auto":
        raise SettingsError("--lr auto is found by training; give a number to draw the schedule.")
    if command == "finetune":
        from transferkit.finetuning.plan import plan_finetune

        plan = plan_finetune(recipe)
        # semi-supervised phases too; a pseudo-labeling round is drawn at its largest
        stages = [(s.name if phase.name == "labeled" else f"{s.name} ({phase.name})", plan.steps(s, phase),
                   plan.stage_lr(s), recipe.schedule) for phase in plan.phases for s in phase.stages]
    else:
        from transferkit.pretraining.plan import plan_pretrain
        from transferkit.training.defaults import resolve_pretrain

        data, split = runs.prepare(recipe)
        recipe, _ = resolve_pretrain(recipe, len(split.train), data.input_shape)
        stages = [(s.name, s.steps, s.learning_rate, s.schedule) for s in plan_pretrain(recipe, len(split.train))]
    cycles_momentum = OneCycleMomentum.supports(make_optimizer(recipe, 1e-3))
    lrs, momenta, starts = [], [], []
    for name, steps, lr, schedule in stages:
        starts.append((sum(len(part) for part in lrs), name))
        options = schedule_options(recipe) if schedule == recipe.schedule else {}
        rate = make_schedule(schedule, lr, max(1, steps), **options)
        step = np.arange(steps)
        lrs.append(np.full(steps, rate) if isinstance(rate, float) else np.asarray([float(rate(i)) for i in step]))
        if isinstance(rate, OneCycle) and cycles_momentum:
            momenta.append(np.asarray(rate.momentum(step.astype("float32"))))
    return ScheduleCurve(np.concatenate(lrs) if lrs else np.zeros(0),
                         np.concatenate(momenta) if momenta else None, starts)


def plot_schedule(curve: ScheduleCurve, path: str | Path, title: str = "") -> Path:
    """Draw the learning rate (and momentum) against the step to PNG `path`, through a temporary file."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from transferkit.figures import save_figure

    path = Path(path)
    if not path.parent.is_dir():
        raise SettingsError(f"The folder of {str(path)!r} does not exist.")
    rows = 2 if curve.momenta is not None else 1
    fig = Figure(figsize=(8, 2.6 * rows + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    axes[0].plot(curve.lrs, color="tab:blue")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("learning rate")
    if curve.momenta is not None:
        axes[1].plot(curve.momenta, color="tab:orange")
        axes[1].set_ylabel("momentum / beta_1")
    for ax in axes:
        for start, name in curve.stage_starts:
            ax.axvline(start, color="gray", lw=0.8, ls="--")
            ax.text(start, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
    axes[-1].set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)
