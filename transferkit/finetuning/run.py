"""Fine-tuning: a new head on a saved encoder, a Keras Applications backbone or any Keras model file.

Training runs in stages. By default stage 1 trains the head with the base
frozen and stage 2 unfreezes the top `unfreeze_top` blocks of the base (0: the
head alone); `unfreeze_schedule` ("head:2,top2:3,all:5") or `gradual` give any
number of stages. Stages that unfreeze blocks train at `lr * finetune_lr_factor`,
with `lr_decay` dividing the rate again for each block below the top one. Each
stage compiles anew with a fresh optimizer (its schedule starts afresh), the
epoch count continues across stages, and BatchNorm layers of the base stay
frozen, so they run in inference mode (Keras 3 runs a BatchNormalization with
`trainable=False` on its moving statistics) unless `train_batchnorm`. A
head-only stage on a frozen, deterministic base trains on base outputs computed
once (`cache_features`; on one replica: under a multi-replica strategy the
base runs every epoch).

Example:

>>> from transferkit.recipe import Recipe
>>> from transferkit.finetuning.run import run_finetune
>>> result = run_finetune(Recipe(from_="saved_models/digits-encoder",
...                              label_fraction=0.05, unfreeze_top=2))  # doctest: +SKIP
"""

from __future__ import annotations

from transferkit.finetuning.plan import plan_finetune
from transferkit.finetuning.stage_loop import train_stages
from transferkit.recipe import Recipe
from transferkit.training import runs
from transferkit.pieces.optimizers import make_optimizer
from transferkit.data.pipelines import pipeline
from transferkit.training.runtime import is_chief, training_context


def run_finetune(recipe: Recipe, verbose: bool = True) -> runs.Result:
    """Build the classifier, train it stage by stage, test it, save it."""
    recipe = recipe.validate()
    settings = recipe.run_settings()  # as given, for the backups: what is chosen from them follows
    with training_context(recipe) as strategy:
        plan = plan_finetune(recipe, strategy.num_replicas_in_sync, writes=True)
        out = plan.out
        verbose = verbose and is_chief()
        trained = train_stages(plan, settings, verbose)
        recipe, data, split, model = plan.recipe, plan.data, plan.split, plan.clf.model
        loss, accuracy = plan.test_loss
        # the last stage trained the head alone, or on soft labels: compile the classifier for the true labels
        if trained.trained is not model or getattr(model, "loss", None) != loss:
            model.compile(optimizer=make_optimizer(recipe, 1e-3), loss=loss, metrics=accuracy)
            # its state made, as loading the artifact makes it: Keras then warns of no mismatch
            model.optimizer.build(model.trainable_variables)
        test_loss, test_accuracy = model.evaluate(
            pipeline(data.x[split.test], data.y[split.test], plan.batch_size), verbose=0)
        metrics = {"test_accuracy": float(test_accuracy), "test_loss": float(test_loss)}
        manifest = runs.base_manifest("classifier", recipe, data, split)
        manifest.update(plan.record, stages=trained.stages, semi_supervised=plan.semi_record, metrics=metrics)
        runs.save_run(out, model, plan.recipe_text, manifest, split, trained.run.history)
        trained.backup.discard()
        runs.print_line(f"test accuracy: {test_accuracy:.4f} (loss {test_loss:.4f}) on {len(split.test)} "
                        f"held-out examples; classifier saved to {out}", verbose)
        return runs.Result(model=model, history=trained.run.history, metrics=metrics, artifact=out,
                           manifest=manifest)
