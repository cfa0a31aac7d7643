"""The learning-rate flags and commands: --schedule, --lr auto, lr-find and schedule --plot."""

import json
from pathlib import Path

import numpy as np
import pytest

import transferkit as tk
from transferkit.commands.learning_rates import schedule_curve
from transferkit.recipe import Recipe
from transferkit.training.defaults import FINETUNE_LR_FACTOR

from helpers import run

FAST = ["--head-epochs", "2", "--epochs", "2", "--label-fraction", "0.1"]


def test_schedule_plot_draws_each_stage_from_its_own_start(encoder_dir, tmp_path):
    out = tmp_path / "schedule.png"
    result = run("schedule", "--from", encoder_dir, "--lr", "0.01", "--unfreeze-top", "1", *FAST, "--plot", out)
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve = schedule_curve(Recipe(from_=str(encoder_dir), lr=0.01, unfreeze_top=1, head_epochs=2, epochs=2,
                                  label_fraction=0.1))
    (start1, name1), (start2, name2) = curve.stage_starts
    assert (name1, name2) == ("head", "top1") and start1 == 0 and start2 == len(curve.lrs) // 2
    # fastai's 1cycle: each stage starts at max_lr / 25 and peaks at max_lr (head 0.01, top1 0.01 x the
    # encoder's default unfreezing factor)
    top = 0.01 * FINETUNE_LR_FACTOR["encoder"]
    np.testing.assert_allclose(curve.lrs[[start1, start2]], [0.01 / 25, top / 25], rtol=1e-5)
    np.testing.assert_allclose([curve.lrs[:start2].max(), curve.lrs[start2:].max()], [0.01, top], rtol=1e-3)
    # Nadam's beta_1 cycles 0.95 -> 0.85 -> 0.95 in each stage
    assert curve.momenta[start1] == pytest.approx(0.95) and curve.momenta[:start2].min() == pytest.approx(0.85)


@pytest.mark.parametrize("mode", ["propagate", "pseudo"])
def test_schedule_draws_the_semi_supervised_phases(mode, encoder_dir):
    from transferkit.finetuning.plan import plan_finetune

    recipe = Recipe(from_=str(encoder_dir), lr=0.01, unfreeze_top=1, head_epochs=2, epochs=3, label_fraction=0.1,
                    semi_supervised=mode, pseudo_rounds=2)
    curve = schedule_curve(recipe)
    split = plan_finetune(recipe).split
    labeled, pool, batches = len(split.labeled), len(split.train) - len(split.labeled), recipe.batch_size
    steps = lambda n: -(-n // batches)  # noqa: E731
    on_pool = lambda epochs: max(1, round(epochs * steps(labeled) / steps(labeled + pool)))  # noqa: E731
    if mode == "propagate":  # every stage on the whole training split, about as many steps; then top1 on the labels
        expected = [("head (propagated)", on_pool(2) * steps(labeled + pool)),
                    ("top1 (propagated)", on_pool(3) * steps(labeled + pool)), ("top1", 3 * steps(labeled))]
    else:  # the stages on the labels, then top1 per round on the labels + at most 10 classes x ceil(r pool / 20)
        expected = [("head", 2 * steps(labeled)), ("top1", 3 * steps(labeled))] + [
            (f"top1 (pseudo{r})", on_pool(3) * steps(labeled + min(pool, 10 * -(-r * pool // 20)))) for r in (1, 2)]
    starts = [start for start, _ in curve.stage_starts] + [len(curve.lrs)]
    assert [name for _, name in curve.stage_starts] == [name for name, _ in expected]
    assert list(np.diff(starts)) == [n for _, n in expected]


DIGITS_TRAIN = 1257  # scikit-learn's 1797 digits less the 20% test and 10% validation parts


def test_schedule_draws_one_cycle_per_stacked_block_and_a_constant_gan():
    stacked = schedule_curve(Recipe(task="stacked", units=(16, 8, 4), epochs=2, lr=0.01), "pretrain")
    per_block = 2 * -(-DIGITS_TRAIN // 32)
    assert [(start, name) for start, name in stacked.stage_starts] == [(i * per_block, f"block {i + 1}")
                                                                       for i in range(3)]
    # each block's 1cycle starts at max_lr / 25 and peaks at max_lr
    np.testing.assert_allclose(stacked.lrs[::per_block], [0.01 / 25] * 3, rtol=1e-5)
    np.testing.assert_allclose(stacked.lrs[:per_block].max(), 0.01, rtol=1e-3)
    gan = schedule_curve(Recipe(task="gan", epochs=2), "pretrain")
    assert len(gan.lrs) == 2 * (DIGITS_TRAIN // 32) and np.all(gan.lrs == 2e-4)  # full batches, DCGAN's rate


def test_a_stacked_run_trains_the_stages_its_plan_says(tmp_path):
    result = tk.pretrain(task="stacked", units=(8, 4), epochs=2, patience=0, out=str(tmp_path / "enc"), verbose=False)
    stages = result.manifest["stages"]
    assert [(s["name"], s["epochs"]) for s in stages] == [("block 1", 2), ("block 2", 2)]
    assert result.history["block"] == [1.0, 1.0, 2.0, 2.0]


def test_lr_find_prints_suggestions_and_writes_the_plot(encoder_dir, tmp_path):
    out = tmp_path / "lr.png"
    result = run("lr-find", "--from", encoder_dir, *FAST, "--num-steps", "30", "--plot", out)
    assert result.exit_code == 0, result.output
    for label in ("valley", "minimum", "steep"):
        assert label in result.output
    assert out.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("args, words", [
    (["--plot", "/no/such/folder/lr.png"], "does not exist"),
    (["--start-lr", "1", "--end-lr", "0.1"], "Expected 0 < start_lr < end_lr"),
    (["--num-steps", "5"], "num_steps must be an integer >= 10"),
])
def test_lr_find_bad_arguments_exit_2(args, words, encoder_dir):
    result = run("lr-find", "--from", encoder_dir, *args)
    assert result.exit_code == 2, result.output
    assert words in result.output


def test_plateau_schedule_lowers_the_rate_when_validation_stalls(encoder_dir, tmp_path):
    result = tk.finetune(from_=str(encoder_dir), schedule="plateau", plateau_factor=0.5, plateau_patience=0,
                         head_epochs=8, epochs=0, lr=1.0, label_fraction=0.1, out=str(tmp_path / "c"),
                         verbose=False)
    rates = result.history["learning_rate"]
    assert rates[0] == pytest.approx(1.0)
    assert min(rates) < 1.0
    # the rate drops exactly after the epochs whose validation loss did not improve on the best so far
    val = result.history["val_loss"]
    stalled = [i for i in range(1, len(val) - 1) if val[i] >= min(val[:i])]
    assert [i for i in range(len(rates) - 1) if rates[i + 1] < rates[i]] == stalled
    # every change is the factor 0.5
    changes = [b / a for a, b in zip(rates, rates[1:]) if not np.isclose(a, b)]
    assert changes and np.allclose(changes, 0.5)


def test_lr_auto_runs_the_finder_before_each_stage(encoder_dir, tmp_path, capsys):
    result = tk.finetune(from_=str(encoder_dir), lr="auto", unfreeze_top=1, head_epochs=1, epochs=1,
                         label_fraction=0.2, out=str(tmp_path / "c"))
    printed = capsys.readouterr().out
    assert printed.count("LR range test") == 2
    manifest = json.loads((Path(result.artifact) / "manifest.json").read_text())
    valleys = [float(line.split()[-1]) for line in printed.splitlines() if "valley" in line]
    assert [s["lr"] for s in manifest["stages"]] == pytest.approx(valleys, rel=5e-3)  # printed to 3 digits
