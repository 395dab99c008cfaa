"""A sweep's report: report.md and its tables from `asl_tune.analysis.compute`'s numbers, beside the figures
`asl_tune.analysis.figures` draws from them, written next to the results.

`analyze` (what `asl-tune analyze` and `asl_tune.analyze` run) reads the sweeps, computes, has the figures
drawn (`Analysis` keeps them for a notebook) and writes

    <results>/<name>/report/  report.md, pareto_front.parquet, importance.parquet,
                              pareto.png, learning_curves.png, confusion_best.png, pairs.png, importance.png

- Several sweeps: each gets its own report, and the comparison (fronts overlaid, one table) goes
  to `<results>/compare-<a>-<b>.../report/`, so no sweep's own report is overwritten.
- Results at a URI (s3://, gs://, file:///...): the Parquet files are copied to the cache folder,
  `<cache>/sweeps/<hash of the URI>/.analyze/<name>/`, and the report is written there, not to the URI
  (compute.local_results); its path is printed as for a folder.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import pandas as pd

from asl_tune.alphabet import WATCH_PAIRS
from asl_tune.analysis.compute import (
    DEFAULT_OBJECTIVES,
    MODES,
    Objectives,
    PairRates,
    Sweep,
    describe_objectives,
    finished,
    finished_pair_rates,
    fixed_params,
    hypervolume,
    importance_problem,
    is_objective_metric,
    load_sweep,
    local_results,
    most_accurate,
    pair_summary,
    param_importance,
    pareto_front,
    reference_point,
    summary,
)
from asl_tune.analysis.figures import LABEL_PARAMS, comparison_figure, format_value, sweep_figures
from asl_tune.analysis.speed import UNDER_LOAD, SpeedOn, use_speed
from asl_tune.errors import AslTuneError
from asl_tune.results import FRAME_BUDGET_MS, PARAM_PREFIX, write_atomic
from asl_tune.sweep.mirror import is_uri

REPORT_DIR = "report"
FRONT_FILE = "pareto_front.parquet"
IMPORTANCE_FILE = "importance.parquet"
WORST_PAIRS = 4  # pairs beyond the watch-list shown in pairs.png: the sweep's most confused

if TYPE_CHECKING:
    from matplotlib.figure import Figure


# ---------------------------------------------------------------------------------------------
# Markdown


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table; params_ prefixes are dropped from the headers."""
    headers = [c[len(PARAM_PREFIX) :] if c.startswith(PARAM_PREFIX) else c for c in frame.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(format_value(v).replace("|", "\\|") for v in row) + " |")
    return "\n".join(lines)


def _thirty_fps(row: pd.Series) -> str:
    """Whether a trial keeps up with 30 fps video at batch 1, with its p95 latency."""
    p95 = row.get("latency_ms_p95")
    if p95 is None or (isinstance(p95, float) and math.isnan(p95)):
        return "unknown (no batch-1 latency recorded)"
    verdict = "yes" if p95 <= FRAME_BUDGET_MS else "no"
    return f"{verdict}: batch-1 latency p95 {p95:.1f} ms against a {FRAME_BUDGET_MS:.1f} ms frame (p50 {format_value(row.get('latency_ms_p50'))} ms)"


def _config_table(row: pd.Series) -> pd.DataFrame:
    """Every params_* setting of one trial, as a two-column table."""
    params = [(c[len(PARAM_PREFIX) :], row[c]) for c in row.index if c.startswith(PARAM_PREFIX)]
    return pd.DataFrame(params, columns=["setting", "value"])


# ---------------------------------------------------------------------------------------------
# Reports


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=100)  # constrained layout already fits the labels: no second, "tight" draw


def _confusion_trial(sweep: Sweep, ranked: pd.DataFrame) -> str | None:
    """The best-ranked trial that has confusion counts (the best one, unless it was stopped before its test evaluation)."""
    with_counts = set(sweep.confusion["trial_id"].unique())
    for trial_id in ranked["trial_id"]:
        if trial_id in with_counts:
            return trial_id
    return None


@dataclass
class SweepReport:
    """What one sweep's report found, for the terminal and for a comparison."""

    sweep: Sweep
    front: pd.DataFrame
    hypervolume: float
    reference: list[float]
    top: pd.DataFrame
    report: Path
    figures: dict[str, Figure]  # SWEEP_FIGURES' stems -> the Figures saved as <stem>.png beside report.md


def write_sweep_report(sweep: Sweep, objectives: Objectives, reference: Sequence[float] | None = None, top: int = 5) -> SweepReport:
    """Compute the tables, draw the figures and write `<sweep>/report/` for one sweep."""
    out = sweep.folder / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    trials = sweep.trials
    front = pareto_front(trials, objectives)
    reference = list(reference) if reference is not None else reference_point(finished(trials), objectives)
    volume = hypervolume(front, objectives, reference)
    ranked = summary(trials, objectives, top=len(trials))
    confusion_id = _confusion_trial(sweep, ranked)
    pairs = finished_pair_rates(trials, sweep.confusion)
    pair_table = pair_summary(pairs, WORST_PAIRS)
    importances = {objective: param_importance(trials, objective) for objective in objectives}
    figures = sweep_figures(sweep, objectives, front, confusion_id, pairs.rates, list(pair_table["column"]), importances)

    write_atomic(front, out / FRONT_FILE)
    for stem, fig in figures.items():
        _save(fig, out / f"{stem}.png")
    tables = [table.assign(objective=objective[0]) for objective, table in importances.items() if not table.empty]
    importance_frame = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["param", "importance", "objective"])
    write_atomic(importance_frame[["objective", "param", "importance"]], out / IMPORTANCE_FILE)
    text = _sweep_markdown(
        sweep, objectives, front, volume, reference, ranked, top, confusion_id, importances, _pairs_note(pairs, pair_table)
    )
    (out / "report.md").write_text(text)
    return SweepReport(sweep, front, volume, reference, ranked.head(top), out / "report.md", figures)


def _sweep_markdown(
    sweep: Sweep,
    objectives: Objectives,
    front: pd.DataFrame,
    volume: float,
    reference: list[float],
    ranked: pd.DataFrame,
    top: int,
    confusion_id: str | None,
    importances: dict,
    pairs_note: str,
) -> str:
    """report.md of one sweep: every table, the figures linked relatively, the best trial in full.

    Long: the report's sections in the order a reader meets them; split, they would only pass the same frames around.
    """
    trials = sweep.trials
    counts = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in trials["status"].value_counts().items())
    best = trials[trials["trial_id"] == ranked.iloc[0]["trial_id"]].iloc[0]
    accurate = most_accurate(trials, objectives)
    ref_text = ", ".join(f"{m} = {format_value(r)}" for (m, _), r in zip(objectives, reference))
    under_load = [UNDER_LOAD + m for m, _ in objectives if UNDER_LOAD + m in front.columns]  # beside figures measured alone
    front_columns = [
        "trial_id",
        "status",
        *[m for m, _ in objectives],
        *under_load,
        *[PARAM_PREFIX + p for p in LABEL_PARAMS if PARAM_PREFIX + p in front.columns],
    ]
    lines = [
        f"# Sweep report: {sweep.name}",
        "",
        f"{len(trials)} trials ({counts}), read from `{Path(sweep.name).as_posix()}`, relative to the results folder.",  # never this machine's path
        f"Objectives: {describe_objectives(objectives)}.",
        "",
        f"Speed figures (infer_img_per_s, latency_ms_p50/p95, keeps_up_30fps): {sweep.speed_note}.",
        "",
        "## Pareto front",
        "",
        "![Pareto front and accuracy against size](pareto.png)",
        "",
        f"{len(front)} finished trials are on the front (`{FRONT_FILE}`); hypervolume {volume:.6g} (reference point: {ref_text}).",
        "",
        markdown_table(front[front_columns]),
        "",
        f"## Top {min(top, len(ranked))} trials (ranked by {objectives[0][0]}, then the other objectives)",
        "",
        markdown_table(ranked.head(top)),
        "",
        f"Most accurate trial (val_accuracy): {accurate['trial_id'] if accurate is not None else 'none'}.",
        "",
        *_best_trial_lines(best, sweep),
        "## Learning curves",
        "",
        "![Validation accuracy against images seen](learning_curves.png)",
        "",
        "Dashed lines ending in an x are trials stopped early by the scheduler.",
        "",
        "## Confusion matrix of the best trial",
        "",
        "![Confusion matrix](confusion_best.png)",
        "",
        _confusion_note(best["trial_id"], confusion_id),
        "",
        "## Confusion pairs",
        "",
        "![Confusion-pair rates across trials](pairs.png)",
        "",
        pairs_note,
        "",
        "## Parameter importance",
        "",
        "![Parameter importance](importance.png)",
        "",
        "PED-ANOVA (Optuna) on a study rebuilt from trials.parquet: how much each setting's distribution among the best trials differs from its distribution overall.",
        "",
    ]
    return "\n".join(lines + _importance_lines(trials, importances))


def _best_trial_lines(best: pd.Series, sweep: Sweep) -> list[str]:
    """report.md's section on the best trial: its figures, where its weights are, and its settings."""
    return [
        f"## Best trial: {best['trial_id']}",
        "",
        f"- status: {best['status']}",
        f"- val accuracy: {format_value(best['val_accuracy'])}, test accuracy: {format_value(best['test_accuracy'])}",
        "- external accuracy: "
        + (format_value(best["external_accuracy"]) if pd.notna(best["external_accuracy"]) else "no external set attached"),
        f"- keeps up with 30 fps video at batch 1 ({sweep.speed_label}): {_thirty_fps(best)}",
        f"- inference ({sweep.speed_label}): {format_value(best['infer_img_per_s'])} img/s at batch 64{_under_load(best)}",
        f"- size: {format_value(best['n_parameters'])} parameters, {format_value(best.get('flops_per_image'))} FLOPs per image (forward); trained {format_value(best['train_seconds'])} s on {format_value(best.get('device'))}",
        "- weights: " + (_weights(best["checkpoint"], sweep) if pd.notna(best.get("checkpoint")) else "no checkpoint recorded"),
        "",
        markdown_table(_config_table(best)),
        "",
    ]


def _under_load(row: pd.Series) -> str:
    """The trial's own throughput figure, taken during training, where the speed columns hold figures measured alone."""
    taken = row.get(UNDER_LOAD + "infer_img_per_s")
    return f" (during training, under load: {format_value(taken)} img/s)" if taken is not None else ""


def _importance_lines(trials: pd.DataFrame, importances: dict) -> list[str]:
    """report.md's importance tables, one per objective, and the settings no finished trial varied."""
    lines = []
    for objective, table in importances.items():
        problem = importance_problem(trials, objective)
        lines += [f"### {objective[0]} ({objective[1]})", "", markdown_table(table) if problem is None else f"Not computed: {problem}.", ""]
    held = fixed_params(finished(trials))
    if held:
        lines += ["Held at one value in every finished trial: " + ", ".join(f"{k} = {format_value(v)}" for k, v in held.items()) + ".", ""]
    return lines


def _confusion_note(best_id: str, confusion_id: str | None) -> str:
    if confusion_id is None:
        return "No trial has test-split confusion counts yet (they are written when a trial completes)."
    if confusion_id != best_id:
        return f"The best trial {best_id} has no confusion counts (stopped before its test evaluation); shown: {confusion_id}, the best trial that has them."
    return f"Trial {best_id}. Red squares: the seed's watch-list pairs ({', '.join(f'{a}->{b}' for a, b in WATCH_PAIRS)})."


def _weights(location: str, sweep: Sweep) -> str:
    """The weights line's path: inside the sweep folder, relative to the results folder, so report.md reads the same wherever the folder is; else as recorded."""
    load = "`asl_tune.train.load_trained(path)` gives the network, ready to `classify` images"
    if not is_uri(location):
        # Ray records absolute paths; the results folder may be named relatively or through a symlink.
        for absolute in (os.path.abspath, os.path.realpath):
            try:
                inside = Path(absolute(location)).relative_to(absolute(sweep.folder))
            except ValueError:
                continue
            return f"`{(Path(sweep.name) / inside).as_posix()}`, relative to the results folder ({load})"
    return f"`{location}` ({load})"


def _pairs_note(pairs: PairRates, table: pd.DataFrame) -> str:
    """The confusion-pair table and where its rates come from."""
    if table.empty:
        return (
            "No finished trial confused one class with another on its test split."
            if pairs.from_counts
            else "No confusion-pair rates were recorded."
        )
    n = len(pairs.rates)
    if pairs.from_counts:
        left = pairs.left_out
        skipped = (
            f" {left} finished trial{' has' if left == 1 else 's have'} no test counts (stopped before the test evaluation) and {'is' if left == 1 else 'are'} left out."
            if left
            else ""
        )
        note = (
            "Rates from each trial's full test confusion matrix (`confusion.parquet`: true X predicted as Y, over X's test images), "
            f"over the {n} finished trial{'' if n == 1 else 's'} that have one: the seed's watch list, then the sweep's most confused other pairs by mean rate.{skipped}"
        )
        rows = table[["pair", "mean", "worst"]]
    else:
        note = (
            "No finished trial has confusion counts (`confusion.parquet`; a sweep from an older version), so these rates are trials.parquet's `pair_*` columns, "
            "which hold the watch list and each trial's own five most confused pairs: a pair's mean and worst cover only the trials that recorded it "
            f"(`trials`, of {n}), and the other pairs are ranked by mean with unrecorded rates taken as 0."
        )
        rows = table[["pair", "mean", "worst", "trials"]]
    rows = rows.rename(columns={"pair": "pair (true->predicted)", "mean": "mean rate", "worst": "worst rate"})
    return note + "\n\n" + markdown_table(rows)


def write_comparison_report(reports: list[SweepReport], objectives: Objectives, fronts: Figure, out: Path, top: int = 5) -> Path:
    """One page comparing sweeps: their fronts overlaid on one plot (comparison_figure's), a row per sweep, the best trials of all."""
    out.mkdir(parents=True, exist_ok=True)
    _save(fronts, out / "pareto.png")

    rows = []
    for r in reports:
        accurate = most_accurate(r.sweep.trials, objectives)
        rows.append(
            (
                r.sweep.name,
                len(r.sweep.trials),
                len(finished(r.sweep.trials)),
                len(r.front),
                r.hypervolume,
                r.top.iloc[0]["trial_id"],
                accurate["trial_id"] if accurate is not None else None,
            )
        )
    table = pd.DataFrame(rows, columns=["sweep", "trials", "finished", "on front", "hypervolume", "best trial", "most accurate"])
    combined = pd.concat([r.top.assign(sweep=r.sweep.name) for r in reports], ignore_index=True)
    metrics = [m for m, _ in objectives]
    combined = combined.sort_values(metrics, ascending=[mode == "min" for _, mode in objectives], na_position="last", kind="stable").head(
        top
    )
    combined = combined[["sweep", *[c for c in combined.columns if c != "sweep"]]]
    links = [f"- [{r.sweep.name}]({Path('..', '..', r.sweep.name, REPORT_DIR, 'report.md').as_posix()})" for r in reports]
    ref_text = ", ".join(f"{m} = {format_value(v)}" for (m, _), v in zip(objectives, reports[0].reference))
    text = "\n".join(
        [
            f"# Sweep comparison: {', '.join(r.sweep.name for r in reports)}",
            "",
            f"Objectives: {describe_objectives(objectives)}. Hypervolumes share one reference point ({ref_text}).",
            "",
            f"Speed figures: {reports[0].sweep.speed_note}.",
            "",
            "![Pareto fronts overlaid](pareto.png)",
            "",
            markdown_table(table),
            "",
            f"## Top {len(combined)} trials across the sweeps",
            "",
            markdown_table(combined),
            "",
            "## Each sweep's own report",
            "",
            *links,
            "",
        ]
    )
    (out / "report.md").write_text(text)
    return out / "report.md"


def comparison_folder(results: Path, names: Sequence[str]) -> Path:
    """Where a comparison of several sweeps goes: <results>/compare-<a>-<b>.../report/."""
    return Path(results) / ("compare-" + "-".join(n.replace("/", "_") for n in names)) / REPORT_DIR


def terminal_summary(reports: list[SweepReport], objectives: Objectives, shown: int = 3) -> str:
    """A few lines per sweep: the best trials, the size of the front, the most accurate trial."""
    lines = []
    for r in reports:
        trials = r.sweep.trials
        accurate = most_accurate(trials, objectives)
        lines.append(
            f"{r.sweep.name}: {len(trials)} trials, {len(finished(trials))} finished; objectives {describe_objectives(objectives)}"
        )
        for _, row in r.top.head(shown).iterrows():
            values = "  ".join(f"{m} {format_value(row[m])}" for m, _ in objectives)
            lines.append(f"  {row['trial_id']}  {values}" + ("  [front]" if row["on_front"] else ""))
        lines.append(f"  speed: {r.sweep.speed_label}")
        lines.append(f"  front: {len(r.front)} trial{'' if len(r.front) == 1 else 's'}, hypervolume {r.hypervolume:.6g}")
        if accurate is not None:
            lines.append(f"  most accurate: {accurate['trial_id']} (val_accuracy {format_value(accurate['val_accuracy'])})")
        if len(r.top) and "checkpoint" in trials.columns:
            weights = trials.loc[trials["trial_id"] == r.top.iloc[0]["trial_id"], "checkpoint"].dropna()
            if len(weights):
                lines.append(f"  best trial's weights: {weights.iloc[0]}")
        lines.append(f"  report: {r.report}")
    return "\n".join(lines)


@dataclass
class Analysis:
    """What `analyze` wrote and found: report.md to read, the terminal summary, and each sweep's tables and figures."""

    reports: list[SweepReport]  # one per sweep, in the order named
    report: Path  # the report.md to read: the sweep's own, or for several sweeps the comparison's
    text: str  # the summary `asl-tune analyze` prints
    comparison: Figure | None = None  # several sweeps: their fronts overlaid (the comparison's pareto.png)

    @property
    def front(self) -> pd.DataFrame:
        """The finished trials on each sweep's Pareto front, a `sweep` column first."""
        return self._stacked([r.front for r in self.reports])

    @property
    def summary(self) -> pd.DataFrame:
        """Each sweep's top trials as its report ranks them (an `on_front` column says which are on the front), a `sweep` column first."""
        return self._stacked([r.top for r in self.reports])

    @property
    def figures(self) -> dict[str, Figure]:
        """The report's plots: SWEEP_FIGURES' stems for one sweep; `<sweep>/<stem>` and `comparison` for several."""
        if len(self.reports) == 1:
            return dict(self.reports[0].figures)
        figures = {f"{r.sweep.name}/{stem}": fig for r in self.reports for stem, fig in r.figures.items()}
        return {**figures, "comparison": self.comparison}

    def _stacked(self, frames: list[pd.DataFrame]) -> pd.DataFrame:
        named = [frame.assign(sweep=r.sweep.name) for r, frame in zip(self.reports, frames)]
        stacked = pd.concat(named, ignore_index=True)
        return stacked[["sweep", *[c for c in stacked.columns if c != "sweep"]]]


def analyze(names: Sequence[str], results: Path, objectives: Objectives | None = None, speed: SpeedOn | None = None) -> Analysis:
    """Write each sweep's report (and, for several, a comparison); return what was written and found.

    speed (analysis.speed.speed_on): measure each architecture alone there, and use those figures for
    the speed columns; None: the figures the trials took during training.
    """
    objectives = list(objectives) if objectives is not None else list(DEFAULT_OBJECTIVES)
    if not names:
        raise AslTuneError("analyze: name at least one sweep")
    for metric, mode in objectives:
        if not is_objective_metric(metric) or mode not in MODES:
            raise AslTuneError(f"--objectives: must be known metric:max|min pairs, got {metric}:{mode}")
    results = local_results(results, names)
    sweeps = [load_sweep(results, name, objectives) for name in names]  # refuse before writing anything
    sweeps = [use_speed(sweep, speed) for sweep in sweeps]
    reference = reference_point(pd.concat([finished(s.trials) for s in sweeps], ignore_index=True), objectives)
    reports = [write_sweep_report(sweep, objectives, reference) for sweep in sweeps]
    text = terminal_summary(reports, objectives)
    if len(reports) == 1:
        return Analysis(reports, reports[0].report, text)
    fronts = comparison_figure([r.sweep for r in reports], [r.front for r in reports], objectives)
    path = write_comparison_report(reports, objectives, fronts, comparison_folder(results, names))
    return Analysis(reports, path, f"{text}\ncomparison: {path}", fronts)
