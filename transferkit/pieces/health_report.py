"""What a health probe found: per-layer figures, verdicts with remedies, the table and the figure.

`Probe` (in `transferkit.pieces.probes`) measures; this module judges and shows.
Nothing here runs a model: the verdicts are rules over the figures.

Example:

>>> from transferkit.pieces.health_report import REMEDIES, Thresholds
>>> Thresholds().describe()["vanishing_gradients"]
"gradient norm < 0.01 x the top layer's"
>>> REMEDIES["clipping"]
'gradient clipping: --clipnorm 1.0 (or --clipvalue 1.0)'
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np

from transferkit.figures import save_figure

# activation -> its output range; outputs within `saturation_margin` of the range from an end are saturated
SATURATING = {"sigmoid": (0.0, 1.0), "hard_sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0),
              "hard_tanh": (-1.0, 1.0), "softsign": (-1.0, 1.0)}
# the activation percentiles each layer reports and the figure draws as bands
PERCENTILES = (1, 5, 25, 50, 75, 95, 99)


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Where a figure becomes a verdict. Every field is stated in the report.

    Attributes:
        vanishing: A layer's gradient norm below this times the top layer's. Defaults to `1e-2`.
        exploding: A layer's gradient norm above this times the top layer's, or above this
            times its own weight norm. Defaults to `1e2`.
        saturated: Fraction of a hidden layer's outputs that are saturated. Defaults to `0.2`.
        saturation_margin: An output is saturated within this fraction of the activation's
            range from an asymptote (sigmoid < 0.01 or > 0.99). Defaults to `0.01`.
        dead: Fraction of a hidden ReLU layer's units that output zero for every example.
            Defaults to `0.75` (at He init the deepest layers of a 50-layer ReLU net already show
            up to about 60% silent units on a batch, because inputs grow alike with depth).
        selu_mean: Largest |mean| of a SELU layer's outputs. Defaults to `0.3`.
        selu_std: Range of the std of a SELU layer's outputs. Defaults to `(0.5, 1.5)`.
    """

    vanishing: float = 1e-2
    exploding: float = 1e2
    saturated: float = 0.2
    saturation_margin: float = 0.01
    dead: float = 0.75
    selu_mean: float = 0.3
    selu_std: tuple[float, float] = (0.5, 1.5)

    def describe(self) -> dict[str, str]:
        """Each verdict's rule, in words."""
        lo, hi = self.selu_std
        return {
            "vanishing_gradients": f"gradient norm < {self.vanishing:g} x the top layer's",
            "exploding_gradients": f"gradient norm > {self.exploding:g} x the top layer's or x its weight norm, "
                                   "or non-finite",
            "saturation": f"> {self.saturated:.0%} of outputs within {self.saturation_margin:.0%} of the range "
                          "from an asymptote",
            "dead_units": f"> {self.dead:.0%} of units output zero for every example",
            "self_normalization": f"SELU output |mean| > {self.selu_mean:g} or std outside [{lo:g}, {hi:g}]",
        }


# remedy -> what to do, and the flag that does it; verdicts list them in the chapter's order
REMEDIES = {
    "initializer": "an initializer that matches the activation (Glorot for sigmoid/tanh, He for the ReLU "
                   "family, LeCun for SELU): transferkit picks it from --activation; in Keras, kernel_initializer=",
    "activation": "a non-saturating activation: --activation relu (or elu, selu)",
    "leaky": "an activation whose units cannot die: --activation leaky_relu (or elu, selu)",
    "batchnorm": "BatchNorm: --batchnorm before (or after)",
    "clipping": "gradient clipping: --clipnorm 1.0 (or --clipvalue 1.0)",
    "learning_rate": "a lower learning rate: --lr (a tenth), or a warm-up with --schedule onecycle, "
                     "or an adaptive --optimizer such as nadam",
    "selu_setup": "SELU's own setup: --activation selu gives LeCun init and alpha dropout; keep inputs "
                  "standardized, --batchnorm none, no --max-norm",
}
VERDICT_REMEDIES = {
    "vanishing_gradients": ("initializer", "activation", "batchnorm"),
    "exploding_gradients": ("initializer", "batchnorm", "clipping", "learning_rate"),
    "saturation": ("initializer", "activation", "batchnorm"),
    "dead_units": ("initializer", "leaky", "batchnorm", "learning_rate"),
    "self_normalization": ("selu_setup",),
}


@dataclasses.dataclass(frozen=True)
class LayerHealth:
    """The figures of one layer with weights; `None` where a figure does not apply.

    Attributes:
        name: the layer's path, `outer/inner` for a nested model.
        kind: the layer's class name.
        activation: the activation measured (its own, or the activation layer after it), or `None`.
        units: size of the last axis of that activation.
        trainable: whether the layer is trainable (gradients are measured either way).
        mean, std: of the activation's outputs over all examples and units.
        saturated: fraction of outputs near an asymptote (saturating activations).
        dead: fraction of units that are zero for every example (ReLU, ReLU6).
        grad_norm: L2 norm of the gradient of the layer's weights, mean over batches.
        weight_norm: L2 norm of the layer's weights.
        grad_to_weight: `grad_norm / weight_norm`.
        grad_to_top: `grad_norm` over the top (last) layer's.
        percentiles: the activation's 1, 5, 25, 50, 75, 95 and 99th percentiles.
    """

    name: str
    kind: str
    activation: str | None
    units: int
    trainable: bool
    mean: float
    std: float
    saturated: float | None
    dead: float | None
    grad_norm: float | None
    weight_norm: float
    grad_to_weight: float | None
    grad_to_top: float | None
    percentiles: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Verdict:
    """A problem found: its kind, the layers, the rule that fired and the remedies in order."""

    kind: str
    layers: tuple[str, ...]
    rule: str
    detail: str
    remedies: tuple[str, ...]

    @property
    def title(self) -> str:
        return self.kind.replace("_", " ")

    def summary(self) -> str:
        """One line: kind, rule, layers."""
        names = ", ".join(self.layers[:4]) + (f", ... ({len(self.layers)} layers)" if len(self.layers) > 4 else "")
        return f"{self.title} ({self.rule}) in {names}{'; ' + self.detail if self.detail else ''}"

    def format(self) -> str:
        steps = "\n".join(f"    {i}. {REMEDIES[r]}" for i, r in enumerate(self.remedies, start=1))
        return f"  {self.summary()}\n    remedies, in order:\n{steps}"


@dataclasses.dataclass(frozen=True)
class DiagnosisReport:
    """What `diagnose` found: one `LayerHealth` per layer with weights, bottom to top, and the verdicts."""

    layers: tuple[LayerHealth, ...]
    verdicts: tuple[Verdict, ...]
    loss: str
    examples: int
    batches: int
    training: bool
    source: str
    thresholds: Thresholds

    @property
    def healthy(self) -> bool:
        return not self.verdicts

    def verdict(self, kind: str) -> Verdict | None:
        """The verdict of `kind` (e.g. `"vanishing_gradients"`), or `None`."""
        return next((v for v in self.verdicts if v.kind == kind), None)

    def layer(self, name: str) -> LayerHealth:
        return next(row for row in self.layers if row.name == name)

    def summary(self) -> dict[str, float]:
        """Scalars for a training history: gradient ratios, worst saturation and dead fraction, verdicts."""
        def worst(values, pick=max):
            values = [v for v in values if v is not None]
            return float(pick(values)) if values else float("nan")

        rows = self.layers
        return {
            "first_to_top": rows[0].grad_to_top if rows and rows[0].grad_to_top is not None else float("nan"),
            "min_grad_to_top": worst((r.grad_to_top for r in rows), min),
            "max_grad_to_top": worst(r.grad_to_top for r in rows),
            "max_grad_to_weight": worst(r.grad_to_weight for r in rows),
            "max_saturated": worst(r.saturated for r in rows[:-1]),
            "max_dead": worst(r.dead for r in rows[:-1]),
            "verdicts": float(len(self.verdicts)),
        }

    def format(self) -> str:
        """The table, the verdicts with their remedies, and the thresholds."""
        width = max([len("layer")] + [len(r.name) + (not r.trainable) for r in self.layers])
        mode = "training" if self.training else "inference"
        lines = [f"diagnose: {self.batches} batches, {self.examples} examples ({self.source}); loss {self.loss}; "
                 f"BatchNorm and dropout in {mode} mode",
                 f"{'layer':<{width}}  {'activation':<11}{'units':>6}{'mean':>9}{'std':>9}{'saturated':>10}"
                 f"{'dead':>7}{'grad norm':>11}{'grad/weight':>12}{'grad/top':>10}"]
        for r in self.layers:
            lines.append(f"{r.name + ('' if r.trainable else '*'):<{width}}  {r.activation or 'linear':<11}{r.units:>6}"
                         f"{r.mean:>9.3f}{r.std:>9.3f}{_pct(r.saturated):>10}{_pct(r.dead):>7}"
                         f"{_sci(r.grad_norm):>11}{_sci(r.grad_to_weight):>12}{_sci(r.grad_to_top):>10}")
        if any(not r.trainable for r in self.layers):
            lines.append("* frozen layer (its gradient is measured as if it trained)")
        if self.verdicts:
            lines.append("verdicts:")
            lines.extend(v.format() for v in self.verdicts)
        else:
            lines.append("verdicts: none (healthy at these thresholds)")
        lines.append("thresholds: " + "; ".join(f"{k.replace('_', ' ')}: {v}"
                                                for k, v in self.thresholds.describe().items()))
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """Write the per-layer gradient and activation figure as a PNG (see `plot_report`)."""
        return plot_report(self, path)


def verdicts(rows: list[LayerHealth], t: Thresholds, has_batchnorm: bool = False) -> list[Verdict]:
    """The verdicts the rules of `t` give on `rows` (bottom to top); BatchNorm is not advised if already there."""
    rules = t.describe()
    hidden = rows[:-1]
    found: list[Verdict] = []

    def add(kind: str, names: list[str], detail: str = "", skip: tuple[str, ...] = ()) -> None:
        if names:
            remedies = tuple(r for r in VERDICT_REMEDIES[kind] if r not in skip)
            found.append(Verdict(kind, tuple(names), rules[kind], detail, remedies))

    no_bn = ("batchnorm",) if has_batchnorm else ()
    # a top layer whose weights are all zero (a zero head before its first step) sends no gradient below it:
    # the layers there read 0, which says nothing of how gradients flow through the net
    flowing = bool(rows) and rows[-1].weight_norm > 0
    vanishing = [r for r in rows if flowing and r.grad_to_top is not None and r.grad_to_top < t.vanishing]
    first = rows[0] if rows else None
    ratio = f"first/top {_sci(first.grad_to_top)}" if first and first.grad_to_top is not None else ""
    non_saturating = all(r.activation not in SATURATING for r in vanishing)
    add("vanishing_gradients", [r.name for r in vanishing], ratio,
        skip=no_bn + (("activation",) if non_saturating else ()))
    non_finite = [r for r in rows if not _finite(r.grad_norm, r.mean, r.std)]
    exploding = non_finite or [r for r in rows if (r.grad_to_top or 0) > t.exploding or (r.grad_to_weight or 0) > t.exploding]
    detail = "non-finite gradients or activations" if non_finite else (
        f"largest grad/top {_sci(max((r.grad_to_top or 0) for r in exploding))}, "
        f"largest grad/weight {_sci(max((r.grad_to_weight or 0) for r in exploding))}" if exploding else "")
    add("exploding_gradients", [r.name for r in exploding], detail, skip=no_bn)
    saturated = [r for r in hidden if r.saturated is not None and r.saturated > t.saturated]
    add("saturation", [r.name for r in saturated],
        f"up to {max((r.saturated for r in saturated), default=0):.0%} saturated", skip=no_bn)
    dead = [r for r in hidden if r.dead is not None and r.dead > t.dead]
    add("dead_units", [r.name for r in dead], f"up to {max((r.dead for r in dead), default=0):.0%} dead", skip=no_bn)
    lo, hi = t.selu_std
    drifting = [r for r in hidden if r.activation == "selu" and _finite(r.mean, r.std)
                and (abs(r.mean) > t.selu_mean or not lo <= r.std <= hi)]
    add("self_normalization", [r.name for r in drifting],
        ", ".join(f"{r.name} mean {r.mean:.2f} std {r.std:.2f}" for r in drifting[:2]))
    return found


def plot_report(report: DiagnosisReport, path: str | Path, title: str | None = None) -> Path:
    """Write `report_figure(report)` as a PNG, through a temporary sibling file and a rename.

    Example:

    >>> plot_report(diagnose(model, (x, y)), "health.png")            # doctest: +SKIP
    PosixPath('health.png')
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_figure(report_figure(report, title), path, dpi=80)


def report_figure(report: DiagnosisReport, title: str | None = None):
    """Per-layer gradient norms and activation distributions: a `matplotlib.figure.Figure` (Agg).

    Four panels, bottom layer on the left: gradient norm relative to the top
    layer's and to the layer's own weights (log scale, verdict zones shaded),
    the activation's percentile bands (1-99, 5-95, 25-75, median) and mean,
    and the saturated and dead fractions with their thresholds.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows, t = report.layers, report.thresholds
    idx = np.arange(len(rows))
    fig = Figure(figsize=(11, 7), dpi=80)
    FigureCanvasAgg(fig)
    (ax_top, ax_weight), (ax_act, ax_frac) = fig.subplots(2, 2, sharex=True)

    def log_panel(ax, values, low, high, label):
        finite = np.array([np.nan if v is None or not np.isfinite(v) or v <= 0 else v for v in values], dtype=float)
        bottom, top = _log_limits(values, low, high)
        ax.set_ylim(bottom, top)
        for lo, hi in ((bottom, low), (high, top)):
            if lo is not None and hi is not None:
                ax.axhspan(lo, hi, color="tab:red", alpha=0.12, lw=0)
        ax.semilogy(idx, finite, "o-", ms=3, lw=1)
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)

    log_panel(ax_top, [r.grad_to_top for r in rows], t.vanishing, t.exploding, "gradient norm / top layer's")
    log_panel(ax_weight, [r.grad_to_weight for r in rows], None, t.exploding, "gradient norm / weight norm")
    p = np.array([r.percentiles for r in rows], dtype=float).reshape(len(rows), len(PERCENTILES))
    for (lo, hi), alpha in (((0, 6), 0.15), ((1, 5), 0.25), ((2, 4), 0.4)):
        ax_act.fill_between(idx, p[:, lo], p[:, hi], color="tab:blue", alpha=alpha, lw=0)
    ax_act.plot(idx, p[:, 3], color="tab:blue", lw=1.2, label="median; bands 25-75, 5-95, 1-99%")
    ax_act.plot(idx, [r.mean for r in rows], color="k", lw=0.8, ls="--", label="mean")
    ax_act.set_ylabel("activation")
    ax_act.legend(fontsize=7, loc="upper right")
    ax_act.grid(True, alpha=0.3)
    width = 0.4
    ax_frac.bar(idx - width / 2, [r.saturated or 0 for r in rows], width, label="saturated", color="tab:orange")
    ax_frac.bar(idx + width / 2, [r.dead or 0 for r in rows], width, label="dead", color="tab:gray")
    ax_frac.axhline(t.saturated, color="tab:orange", ls=":", lw=1, label="saturation threshold")
    ax_frac.axhline(t.dead, color="tab:gray", ls=":", lw=1, label="dead threshold")
    ax_frac.set_ylim(0, 1.02)
    ax_frac.set_ylabel("fraction")
    ax_frac.legend(fontsize=7, loc="upper right")
    step = max(1, len(rows) // 12)
    for ax in (ax_act, ax_frac):
        ax.set_xticks(idx[::step])
        ax.set_xticklabels([rows[i].name.split("/")[-1] for i in idx[::step]], rotation=45, ha="right", fontsize=7)
        ax.set_xlabel("layer, bottom to top", fontsize=8)
    verdict_names = ", ".join(f"{v.title} ({len(v.layers)})" for v in report.verdicts) or "no verdict"
    fig.suptitle(title or f"{len(rows)} layers, bottom to top: {verdict_names}", fontsize=11)
    fig.tight_layout()
    return fig


def _finite(*values: float | None) -> bool:
    return all(v is None or math.isfinite(v) for v in values)


def _log_limits(values, low: float | None, high: float | None) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    lo = min(finite + [low or 1.0]) / 3
    hi = max(finite + [high or 1.0]) * 3
    return lo, hi


def _sci(value: float | None) -> str:
    return "-" if value is None else f"{value:.2e}"


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.1%}"
