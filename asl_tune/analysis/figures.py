"""A sweep's figures, drawn from the numbers `asl_tune.analysis.compute` gives: compute first, draw second.

Each `plot_*` function draws computed frames on a matplotlib Axes it is given and never shows or saves
anything; `sweep_figures` and `comparison_figure` lay them out as Figures not registered with pyplot, which
`asl_tune.analysis.report` saves beside report.md and `Analysis` keeps for a notebook.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import pandas as pd

from asl_tune.alphabet import ASL_CLASSES, WATCH_PAIRS
from asl_tune.analysis.compute import Objectives, Sweep, finished, importance_problem, numeric_trials
from asl_tune.analysis.speed import FIGURES
from asl_tune.results import FINISHED, PAIR_PREFIX, PARAM_PREFIX, confusion_counts

if TYPE_CHECKING:
    from matplotlib.figure import Figure


LABEL_PARAMS = ("head_width", "lr", "data_fraction")  # what a point on the front is labelled with
SWEEP_FIGURES = ("pareto", "learning_curves", "confusion_best", "pairs", "importance")  # each saved as <stem>.png
LINES_ONE_BY_ONE = 200  # learning curves: above this many trials, drawn as one collection of lines
TRIAL_TICKS = 60  # pair rates: above this many trials, no tick label a trial


def format_value(value) -> str:
    """A value as a table cell or a label shows it: floats to 4 significant figures, booleans as yes/no, missing as n/a."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return f"{value:,.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"  # parameter counts in full
    return str(value)


def _label(row: pd.Series) -> str:
    """A front point's label: head width, lr and data fraction, as far as the sweep recorded them."""
    parts = []
    for name, short in zip(LABEL_PARAMS, ("h", "lr ", "frac ")):
        value = row.get(PARAM_PREFIX + name)
        if value is not None and not (isinstance(value, float) and math.isnan(value)):
            parts.append(f"{short}{format_value(value)}")
    return " ".join(parts) or str(row["trial_id"])


def plot_pareto(
    ax,
    trials: pd.DataFrame,
    front: pd.DataFrame,
    objectives: Objectives,
    label: str | None = None,
    color: str = "C0",
    speed_label: str = "",
) -> None:
    """Every trial faded, the front highlighted and labelled; x is the second objective (the trial's index with one).

    speed_label (Sweep.speed_label) goes under an axis that is a speed figure: where it was measured.
    """
    objectives = list(objectives)
    frame = numeric_trials(trials)
    y_metric = objectives[0][0]
    x_metric = objectives[1][0] if len(objectives) > 1 else None
    prefix = f"{label}: " if label else ""

    def xs(df: pd.DataFrame):
        return df[x_metric] if x_metric else df["trial_id"].map({t: i for i, t in enumerate(frame["trial_id"])})

    done = finished(frame)
    others = frame[~frame["status"].isin(FINISHED)]
    ax.scatter(xs(done), done[y_metric], color=color, alpha=0.25, s=25, label=f"{prefix}finished trials")
    if others[y_metric].notna().any():
        ax.scatter(xs(others), others[y_metric], color="grey", marker="x", alpha=0.5, s=25, label=f"{prefix}not finished")
    if len(front):
        fx, fy = xs(front), front[y_metric]
        ax.scatter(fx, fy, color=color, s=60, edgecolor="black", zorder=3, label=f"{prefix}Pareto front ({len(front)})")
        if x_metric and len(objectives) == 2:
            order = np.argsort(fx.to_numpy(), kind="stable")
            ax.step(
                fx.to_numpy()[order], fy.to_numpy()[order], where="pre" if objectives[1][1] == "max" else "post", color=color, alpha=0.8
            )
        for (_, row), x, y in zip(front.iterrows(), fx, fy):
            ax.annotate(_label(row), (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    ax.set_xlabel(_axis_label(x_metric, objectives[1][1], speed_label) if x_metric else "trial")
    ax.set_ylabel(_axis_label(y_metric, objectives[0][1], speed_label))
    title = "Pareto front" + (f" (first two of {len(objectives)} objectives)" if len(objectives) > 2 else "")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="best")


def _axis_label(metric: str, mode: str, speed_label: str) -> str:
    """An objective's axis label; a speed figure's also says where it was measured."""
    return f"{metric} ({mode})" + (f"\n{speed_label}" if metric in FIGURES and speed_label else "")


def plot_secondary(ax, trials: pd.DataFrame) -> None:
    """val_accuracy of the finished trials against their parameter count (or train_seconds when that never varies)."""
    frame = finished(numeric_trials(trials)).dropna(subset=["val_accuracy"])
    x_metric = "n_parameters" if frame["n_parameters"].nunique() > 1 else "train_seconds"
    points = frame.dropna(subset=[x_metric])
    colors = ["C1" if s == "stopped_early" else "C0" for s in points["status"]]
    ax.scatter(points[x_metric], points["val_accuracy"], c=colors, s=30)
    ax.scatter([], [], c="C0", label="completed")
    ax.scatter([], [], c="C1", label="stopped early")
    ax.set_xlabel(x_metric)
    ax.set_ylabel("val_accuracy")
    ax.set_title(f"Accuracy against {x_metric}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)


def plot_learning_curves(ax, trials: pd.DataFrame, epochs: pd.DataFrame) -> None:
    """val_accuracy against images seen, one line per trial; early-stopped trials dashed and ending in an x."""
    status = dict(zip(trials["trial_id"], trials["status"]))
    frame = epochs.copy()
    for column in ("epoch", "val_accuracy", "images_seen"):
        frame[column] = pd.to_numeric(frame[column], errors="coerce")
    x_metric = "images_seen" if frame["images_seen"].notna().any() else "epoch"
    ids = sorted(frame["trial_id"].unique(), key=str)
    by_trial = dict(
        tuple(frame.sort_values("epoch", kind="stable").groupby("trial_id", sort=False))
    )  # one pass: a filter per trial was O(trials x rows)
    curves, ends = [], []
    for i, trial_id in enumerate(ids):
        rows = by_trial[trial_id]
        stopped = status.get(trial_id) == "stopped_early"
        color = f"C{i % 10}"
        if len(ids) <= LINES_ONE_BY_ONE:
            ax.plot(
                rows[x_metric],
                rows["val_accuracy"],
                linestyle="--" if stopped else "-",
                marker=".",
                color=color,
                label=str(trial_id) if len(ids) <= 12 else None,
            )
        else:
            curves.append((np.column_stack([rows[x_metric], rows["val_accuracy"]]), "--" if stopped else "-", color))
        if stopped and rows["val_accuracy"].notna().any():
            last = rows.dropna(subset=["val_accuracy"]).iloc[-1]
            ends.append((last[x_metric], last["val_accuracy"], color))
    if curves:  # thousands of trials: one collection of lines, drawn in one go (an Axes line each took minutes to save)
        from matplotlib.collections import LineCollection

        ax.add_collection(
            LineCollection(
                [c for c, _, _ in curves], colors=[k for _, _, k in curves], linestyles=[s for _, s, _ in curves], linewidths=0.5
            )
        )
        ax.autoscale_view()
    if ends:
        ax.scatter(
            [x for x, _, _ in ends],
            [y for _, y, _ in ends],
            marker="x",
            s=100 if len(ids) <= LINES_ONE_BY_ONE else 10,
            c=[k for _, _, k in ends],
            zorder=3,
        )
    ax.plot([], [], "k--x", label="stopped early")
    ax.set_xlabel(x_metric.replace("_", " "))
    ax.set_ylabel("val_accuracy")
    ax.set_title("Learning curves")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_confusion(ax, confusion: pd.DataFrame, classes: Sequence[str]) -> None:
    """One trial's confusion matrix, each row divided by its support, with the watch-list cells outlined in red."""
    from matplotlib.patches import Rectangle

    counts = confusion_counts(confusion, classes).astype(float)
    support = counts.sum(axis=1, keepdims=True)
    rates = np.divide(counts, support, out=np.zeros_like(counts), where=support > 0)
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    ax.figure.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    ax.set_xticks(range(len(classes)), classes, rotation=90, fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    for true, pred in WATCH_PAIRS:
        if true in classes and pred in classes:
            t, p = list(classes).index(true), list(classes).index(pred)
            ax.add_patch(Rectangle((p - 0.5, t - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.5))
            ax.annotate(f"{rates[t, p]:.0%}", (p, t), ha="center", va="center", fontsize=5, color="red")
    ax.set_title("Confusion, row-normalised (red: watch-list pairs)")


def plot_pairs(ax, rates: pd.DataFrame, columns: Sequence[str]) -> None:
    """The given pair columns of `rates` (one row per trial, as `finished_pair_rates` gives) across the trials, in id order; watch-list pairs solid."""
    frame = (
        rates.dropna(subset=list(columns), how="all").sort_values("trial_id", key=lambda ids: ids.astype(str), kind="stable")
        if columns
        else rates.iloc[0:0]
    )
    if frame.empty:
        ax.text(0.5, 0.5, "no confusion-pair rates recorded", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return
    watch_list = {f"{PAIR_PREFIX}{a}_as_{b}" for a, b in WATCH_PAIRS}
    x = np.arange(len(frame))
    for column in columns:
        watch = column in watch_list
        name = column[len(PAIR_PREFIX) :].replace("_as_", "->")
        ax.plot(x, frame[column], marker="o" if watch else "s", linestyle="-" if watch else ":", label=name + ("" if watch else " (worst)"))
    if len(frame) <= TRIAL_TICKS:
        ax.set_xticks(x, [str(t) for t in frame["trial_id"]], rotation=45, ha="right", fontsize=7)
    else:  # a label a trial at thousands of trials is unreadable, and laying them out took minutes
        ax.set_xlabel(f"trials in id order ({len(frame):,})")
    ax.set_ylabel("share of the true class predicted as the other")
    ax.set_ylim(bottom=0)
    ax.set_title("Confusion-pair rates across trials")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)


def plot_importance(ax, importance: pd.DataFrame, note: str = "") -> None:
    """Horizontal bars of parameter importance, the most important on top; `note` instead when the frame is empty."""
    if importance.empty:
        ax.text(0.5, 0.5, f"not computed: {note}" if note else "not computed", ha="center", va="center", wrap=True, transform=ax.transAxes)
        ax.set_axis_off()
        return
    ordered = importance.iloc[::-1]
    ax.barh(ordered["param"], ordered["importance"], color="C2")
    ax.set_xlabel("importance (PED-ANOVA, sums to 1)")
    ax.set_xlim(0, 1)
    ax.grid(True, axis="x", alpha=0.3)


def _figure(width: float, height: float, ncols: int = 1):
    """A Figure not registered with pyplot (nothing to show or close) and its Axes."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, list(fig.subplots(1, ncols, squeeze=False)[0])


def _classes(confusion: pd.DataFrame) -> list[str]:
    """The class labels the counts name, in ASL order (A..Z, del, nothing, space), then any others sorted."""
    labels = set(confusion["true_label"]) | set(confusion["pred_label"])
    return [c for c in ASL_CLASSES if c in labels] + sorted(labels - set(ASL_CLASSES))


def sweep_figures(
    sweep: Sweep,
    objectives: Objectives,
    front: pd.DataFrame,
    confusion_id: str | None,
    pair_rates: pd.DataFrame,
    pair_columns: list[str],
    importances: dict,
) -> dict:
    """One sweep's report plots as matplotlib Figures keyed by SWEEP_FIGURES' stems: drawn, never shown or saved."""
    trials = sweep.trials
    figures = {}
    figures["pareto"], (left, right) = _figure(12, 5, ncols=2)
    plot_pareto(left, trials, front, objectives, speed_label=sweep.speed_label)
    plot_secondary(right, trials)

    figures["learning_curves"], [ax] = _figure(8, 5)
    plot_learning_curves(ax, trials, sweep.epochs)

    figures["confusion_best"], [ax] = _figure(9, 8)
    if confusion_id is None:
        ax.text(0.5, 0.5, "no trial has confusion counts yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        rows = sweep.confusion[sweep.confusion["trial_id"] == confusion_id]
        plot_confusion(ax, rows, _classes(rows))
        ax.set_title(f"{confusion_id}: " + ax.get_title())

    figures["pairs"], [ax] = _figure(9, 5)
    plot_pairs(ax, pair_rates, pair_columns)

    figures["importance"], axes = _figure(5 * len(objectives), 4, ncols=len(objectives))
    for ax, (objective, table) in zip(axes, importances.items()):
        plot_importance(ax, table, note=importance_problem(trials, objective) or "")
        ax.set_title(f"Importance for {objective[0]}")
    return figures


def comparison_figure(sweeps: Sequence[Sweep], fronts: Sequence[pd.DataFrame], objectives: Objectives) -> Figure:
    """The sweeps' Pareto fronts overlaid on one plot, a colour per sweep: drawn, never shown or saved."""
    fig, [ax] = _figure(9, 6)
    for i, (sweep, front) in enumerate(zip(sweeps, fronts)):
        plot_pareto(ax, sweep.trials, front, objectives, label=sweep.name, color=f"C{i % 10}", speed_label=sweep.speed_label)
    ax.set_title("Pareto fronts, overlaid")
    return fig
