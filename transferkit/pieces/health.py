"""`TrainingHealth`: the figures of `diagnose`, recorded during `fit`.

Example:

>>> from transferkit.pieces.health import TrainingHealth
>>> health = TrainingHealth((x_train, y_train), every=50, log_dir="logs/run1")   # doctest: +SKIP
>>> model.fit(x_train, y_train, epochs=5, callbacks=[health])                   # doctest: +SKIP
>>> health.reports[-1][1].format()                                               # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable

import keras

from transferkit.pieces.health_report import REMEDIES, DiagnosisReport, Thresholds
from transferkit.pieces.probes import Probe, check_count, prepare_batches

HISTORY_PREFIX = "health_"


class TrainingHealth(keras.callbacks.Callback):
    """Checks gradient and activation health every `every` training steps.

    Before the first step of each `fit` and before every step whose number
    is a multiple of `every` (counted across `fit` calls, from
    `initial_step`), it runs `batches` fixed batches of `data` forward and
    backward once each, on copies of the variables, so training itself is
    untouched: with one `fit`, at most one extra pass per batch every `every` steps. At each epoch's end it adds the latest check's summary to the
    logs (so to `History` and `history.json`) as `health_first_to_top`,
    `health_min_grad_to_top`, `health_max_grad_to_top`,
    `health_max_grad_to_weight`, `health_max_saturated`, `health_max_dead`
    and `health_verdicts`. It warns once per kind of verdict. With `log_dir`
    it writes each check's per-layer figures as TensorBoard scalars under
    `log_dir/health` (tags like `grad_to_top/dense_3`) and verdicts as text.

    Example:

    >>> health = TrainingHealth((x, y), every=100, log_dir="logs")     # doctest: +SKIP
    >>> model.fit(x, y, callbacks=[health])                             # doctest: +SKIP
    >>> [v.kind for v in health.reports[-1][1].verdicts]                # doctest: +SKIP
    []

    Args:
        data: `(x, y)` arrays, inputs alone, or a batched `tf.data.Dataset`;
            `batches` batches of it are taken once and reused at every check.
        every: Int >= 1. Steps between checks. Defaults to `50`.
        log_dir: Optional path. TensorBoard folder (the run's `--tensorboard`
            folder); figures go to its `health` subfolder. Defaults to `None`.
        batches: Int >= 1. Batches per check (each one forward/backward pass). Defaults to `1`.
        batch_size: Int >= 1. Examples per batch, for arrays. Defaults to `32`.
        loss: `"auto"`, a loss name or callable, as for `diagnose`. Defaults to `"auto"`.
        thresholds: Optional `Thresholds` of the verdicts. Defaults to `Thresholds()`.
        warn: Bool. Warn the first time each kind of verdict appears. Defaults to `True`.
        initial_step: Int >= 0. Steps already trained (by earlier stages), so checks and
            TensorBoard steps continue, like `fit`'s `initial_epoch`. Defaults to `0`.

    Attributes:
        reports: `(step, DiagnosisReport)` for every check so far.

    Raises:
        SettingsError: `every`, `batches` or `batch_size` below 1, or unusable data.
    """

    def __init__(self, data: Any, every: int = 50, log_dir: str | Path | None = None, batches: int = 1,
                 batch_size: int = 32, loss: str | Callable | None = "auto", thresholds: Thresholds | None = None,
                 warn: bool = True, initial_step: int = 0):
        super().__init__()
        for name, value in (("every", every), ("batches", batches), ("batch_size", batch_size)):
            check_count(name, value)
        check_count("initial_step", initial_step, minimum=0)
        self.data = data
        self.every = every
        self.log_dir = None if log_dir is None else str(log_dir)
        self.batches = batches
        self.batch_size = batch_size
        self.loss = loss
        self.thresholds = thresholds or Thresholds()
        self.warn = warn
        self.reports: list[tuple[int, DiagnosisReport]] = []
        self._fixed = prepare_batches(data, batches, batch_size)
        self._probe: Probe | None = None
        self.initial_step = initial_step
        self._step = initial_step
        self._warned: set[str] = set()
        self._writer = None
        self._fit_started = False

    def on_train_begin(self, logs=None) -> None:
        if self._probe is None or self._probe.model is not self.model:
            self._probe = Probe(self.model)
        self._fit_started = True

    def on_train_batch_begin(self, batch, logs=None) -> None:
        if self._fit_started or self._step % self.every == 0:
            self.model  # noqa: B018 -- on JAX, reading it puts fit's current values back into the variables
            self.check()
        self._fit_started = False
        self._step += 1

    def on_epoch_end(self, epoch, logs=None) -> None:
        if logs is not None and self.reports:
            logs.update({HISTORY_PREFIX + k: v for k, v in self.reports[-1][1].summary().items()})

    def on_train_end(self, logs=None) -> None:
        if self._writer is not None:
            self._writer.flush()

    def check(self) -> DiagnosisReport:
        """Run the fixed batches now; record, warn and log the report."""
        report = self._probe.run(self._fixed, loss=self.loss, thresholds=self.thresholds,
                                 source=f"{len(self._fixed)} fixed batches, step {self._step}")
        self.reports.append((self._step, report))
        for verdict in report.verdicts:
            if self.warn and verdict.kind not in self._warned:
                self._warned.add(verdict.kind)
                warnings.warn(f"TrainingHealth at step {self._step}: {verdict.summary()}. Remedies, in order: "
                              + "; ".join(f"{i}. {REMEDIES[r]}" for i, r in enumerate(verdict.remedies, start=1)),
                              UserWarning, stacklevel=2)
        if self.log_dir is not None:
            self._write(report)
        return report

    def _write(self, report: DiagnosisReport) -> None:
        """Scalars and text through `tf.summary.write`, which needs no `tensorboard` package to write."""
        import tensorflow as tf
        from tensorflow.core.framework.summary_pb2 import SummaryMetadata

        def plugin(name):
            return SummaryMetadata(plugin_data=SummaryMetadata.PluginData(plugin_name=name))

        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(Path(self.log_dir) / "health"))
        scalars = {f"{figure}/{row.name}": getattr(row, figure) for row in report.layers
                   for figure in ("mean", "std", "saturated", "dead", "grad_norm", "grad_to_weight", "grad_to_top")}
        scalars.update({f"summary/{key}": value for key, value in report.summary().items()})
        with self._writer.as_default():
            for tag, value in scalars.items():
                if value is not None:
                    tf.summary.write(tag, tf.constant(float(value), "float32"), step=self._step,
                                     metadata=plugin("scalars"))
            if report.verdicts:
                text = "\n\n".join(v.summary() for v in report.verdicts)
                tf.summary.write("verdicts", tf.constant(text), step=self._step, metadata=plugin("text"))
