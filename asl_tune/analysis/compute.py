"""The numbers in a sweep's Parquet results: the Pareto front, hypervolume, the top trials, importance.

Every function here returns plain values or DataFrames and draws nothing; `asl_tune.analysis.report` turns
them into plots and a report. Only the Parquet files are read (through `asl_tune.results`), never
Ray's or Optuna's own state, so a sweep that is still running, was resumed, or was copied back from
a cluster gives the same numbers.

Choices worth knowing:
- The front holds finished trials (completed or stopped early) with a value for every objective.
  Identical points do not dominate each other, so ties are all kept.
- Hypervolume is exact in any dimension (2-D: a sweep over the sorted front; more: slicing along
  the last objective, recursively; fine for the tens of points a front holds). Its default
  reference point is, per objective, the bad end of the metric's natural range where it has one:
  0 for a maximised metric (accuracy and throughput are >= 0; a negative value seen moves it
  lower), 1 for a minimised share (accuracies, pair_* rates). Minimised metrics with no upper bound
  (latency, seconds, parameters) take 1.1 x the worst value seen: the margin keeps the trials at
  the worst end counted instead of adding zero. `asl_tune.analysis.report.analyze` takes that worst over
  every finished trial of every sweep it is given, so compared sweeps' hypervolumes share one reference.
- Parameter importance is Optuna's PED-ANOVA, run on an in-memory study rebuilt from trials.parquet
  (so it needs no study and works on copied-back results).
- Confusion-pair rates come from each trial's full test confusion matrix (confusion.parquet), not
  from trials.parquet's pair_* columns: a trial records only the watch list and its own five worst
  pairs there, so a pair is missing wherever it was not among them and any average of those columns
  covers only the trials where the pair was bad. `load_sweep` recomputes the recorded pair_* columns
  (so `--objectives pair_X_as_Y` ranks every trial on its true rate); `finished_pair_rates` gives
  every pair. A sweep without confusion counts falls back to the pair_* columns.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from asl_tune.alphabet import ASL_CLASSES, WATCH_PAIRS
from asl_tune.errors import AslTuneError
from asl_tune.results import (
    CONFUSION,
    EPOCHS,
    FINISHED,
    METRICS,
    PAIR_PREFIX,
    PARAM_PREFIX,
    RESULT_FILES,
    TRIAL_COLUMNS,
    TRIALS,
    is_plain_name,
    table_frame,
)
from asl_tune.sweep.integrity import check_for_analysis
from asl_tune.sweep.mirror import sweep_folder

Objectives = Sequence[tuple[str, str]]  # (metric, "max" | "min") pairs, in priority order

DEFAULT_OBJECTIVES: list[tuple[str, str]] = [("val_accuracy", "max"), ("infer_img_per_s", "max")]
MODES = ("max", "min")
SHARE_METRICS = ("val_accuracy", "test_accuracy", "external_accuracy")  # shares in [0, 1], like the pair_* rates
_PAIR_RE = re.compile(rf"^{PAIR_PREFIX}(.+)_as_(.+)$")


# ---------------------------------------------------------------------------------------------
# Objectives


def parse_objectives(text: str) -> list[tuple[str, str]]:
    """`val_accuracy:max,infer_img_per_s:max` as [(metric, mode), ...]; every mistake is one AslTuneError line."""
    items = [item.strip() for item in str(text).split(",")]
    if not text or not str(text).strip() or any(not item for item in items):
        raise AslTuneError(f"--objectives: must be a comma-separated list of metric:max or metric:min, got {text!r}")
    objectives: list[tuple[str, str]] = []
    for item in items:
        metric, sep, mode = (part.strip() for part in item.partition(":"))
        if not sep or ":" in mode:
            raise AslTuneError(f"--objectives: each objective must be metric:max or metric:min, got {item!r}")
        if not is_objective_metric(metric):
            known = ", ".join(METRICS)
            raise AslTuneError(f"--objectives: metric must be one of {known} or pair_<X>_as_<Y> with X, Y class names, got {metric!r}")
        if mode not in MODES:
            raise AslTuneError(f"--objectives: mode must be max or min, got {mode!r} in {item!r}")
        if metric in (m for m, _ in objectives):
            raise AslTuneError(f"--objectives: each metric may appear once, got {metric!r} twice")
        objectives.append((metric, mode))
    return objectives


def is_objective_metric(name: str) -> bool:
    """True for a numeric trials.parquet metric or a pair_<X>_as_<Y> confusion rate between two class names."""
    if name in METRICS:
        return True
    match = _PAIR_RE.match(name)
    return bool(match) and match.group(1) in ASL_CLASSES and match.group(2) in ASL_CLASSES


def describe_objectives(objectives: Objectives) -> str:
    return ", ".join(f"{m} ({mode})" for m, mode in objectives)


# ---------------------------------------------------------------------------------------------
# Tables


def numeric_trials(trials: pd.DataFrame) -> pd.DataFrame:
    """A copy with every metric and pair column as float (None -> NaN) and missing metric columns added as NaN."""
    out = trials.copy()
    for column in TRIAL_COLUMNS:
        if column not in out.columns:
            out[column] = None
    for column in [*METRICS, *(c for c in out.columns if c.startswith(PAIR_PREFIX))]:
        out[column] = pd.to_numeric(out[column], errors="coerce").astype(float)
    return out


def finished(trials: pd.DataFrame) -> pd.DataFrame:
    """The trials whose accuracy can be compared: completed or stopped early."""
    return trials[trials["status"].isin(FINISHED)]


def _losses(frame: pd.DataFrame, objectives: Objectives) -> np.ndarray:
    """(N, K) objective values turned into losses: maximised metrics negated, so smaller is better everywhere."""
    columns = [frame[m].astype(float).to_numpy() * (-1.0 if mode == "max" else 1.0) for m, mode in objectives]
    return np.column_stack(columns) if columns else np.empty((len(frame), 0))


def _non_dominated(losses: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows that no other row dominates (<= everywhere and < somewhere)."""
    keep = np.zeros(len(losses), dtype=bool)
    front = np.empty((0, losses.shape[1]))
    # In lexicographic order a row's dominators come before it, and a dominated row has a non-dominated dominator:
    # checking each row against the front so far is exact, and O(N x front) instead of O(N^2) (10,000 trials: minutes).
    for i in np.lexsort(losses.T[::-1]) if losses.shape[1] else range(len(losses)):
        point = losses[i]
        if len(front) and ((front <= point).all(axis=1) & (front < point).any(axis=1)).any():
            continue
        keep[i] = True
        front = np.vstack([front, point])
    return keep


def pareto_front(trials: pd.DataFrame, objectives: Objectives) -> pd.DataFrame:
    """Exactly the non-dominated finished trials, those with a value for every objective; ties all stay."""
    objectives = list(objectives)
    if not objectives:
        raise AslTuneError("--objectives: at least one objective is needed")
    frame = numeric_trials(trials)
    missing = [m for m, _ in objectives if m not in frame.columns]
    if missing:
        return frame.iloc[0:0]
    candidates = finished(frame).dropna(subset=[m for m, _ in objectives])
    mask = _non_dominated(_losses(candidates, objectives))
    return (
        candidates[mask]
        .sort_values([m for m, _ in objectives], ascending=[mode == "min" for _, mode in objectives], kind="stable")
        .reset_index(drop=True)
    )


def reference_point(trials: pd.DataFrame, objectives: Objectives) -> list[float]:
    """The default hypervolume reference: min(0, worst) when maximised; 1 for a minimised share; else 1.1 x the worst value."""
    frame = numeric_trials(trials)
    point = []
    for metric, mode in objectives:
        values = frame[metric].dropna() if metric in frame.columns else pd.Series(dtype=float)
        if mode == "max":
            point.append(min(0.0, float(values.min())) if len(values) else 0.0)
        elif metric in SHARE_METRICS or metric.startswith(PAIR_PREFIX):
            point.append(max(1.0, float(values.max())) if len(values) else 1.0)
        else:
            worst = float(values.max()) if len(values) else 0.0
            point.append(worst + 0.1 * abs(worst))
    return point


def hypervolume(front: pd.DataFrame, objectives: Objectives, reference: Sequence[float] | None = None) -> float:
    """Exact volume of objective space the front dominates, bounded by the reference point (see the module notes)."""
    objectives = list(objectives)
    frame = numeric_trials(front).dropna(subset=[m for m, _ in objectives])
    if reference is None:
        reference = reference_point(frame, objectives)
    ref = np.array([r * (-1.0 if mode == "max" else 1.0) for r, (_, mode) in zip(reference, objectives)], dtype=float)
    losses = _losses(frame, objectives)
    losses = losses[(losses < ref).all(axis=1)]  # points not beyond the reference everywhere add nothing
    return float(_hv(losses, ref)) if len(losses) else 0.0


def _hv(losses: np.ndarray, ref: np.ndarray) -> float:
    """Exact hypervolume of loss points that all lie strictly below ref: 1-D and 2-D directly, more by slicing."""
    if losses.shape[1] == 1:
        return float(ref[0] - losses[:, 0].min())
    if losses.shape[1] == 2:
        points = losses[np.lexsort((losses[:, 1], losses[:, 0]))]  # by first loss, then second
        volume, best_second = 0.0, ref[1]
        for first, second in points:
            if second < best_second:
                volume += (ref[0] - first) * (best_second - second)
                best_second = second
        return volume
    # Slice along the last objective: between consecutive distinct values, the points at or
    # below the slice dominate a fixed (K-1)-dimensional region.
    order = np.argsort(losses[:, -1], kind="stable")
    points = losses[order]
    cuts = [*np.unique(points[:, -1]), ref[-1]]
    volume = 0.0
    for low, high in zip(cuts[:-1], cuts[1:]):
        below = points[points[:, -1] <= low, :-1]
        volume += (high - low) * _hv(below[_non_dominated(below)], ref[:-1])
    return volume


def summary(trials: pd.DataFrame, objectives: Objectives, top: int = 5) -> pd.DataFrame:
    """The `top` finished trials, ranked by the objectives in order (NaN last), with their front membership and settings."""
    objectives = list(objectives)
    frame = finished(numeric_trials(trials))
    metrics = [m for m, _ in objectives]
    ranked = frame.sort_values(metrics, ascending=[mode == "min" for _, mode in objectives], na_position="last", kind="stable")
    front_ids = set(pareto_front(trials, objectives)["trial_id"])
    ranked = ranked.assign(on_front=ranked["trial_id"].isin(front_ids))
    extra = [
        c
        for c in ("val_accuracy", "test_accuracy", "external_accuracy", "latency_ms_p95", "n_parameters", "train_seconds")
        if c not in metrics and ranked[c].notna().any()
    ]
    return ranked[["trial_id", "status", *metrics, "on_front", *extra, *varying_params(frame)]].head(top).reset_index(drop=True)


def varying_params(trials: pd.DataFrame) -> list[str]:
    """The params_* columns that take more than one value among these trials."""
    return [c for c in trials.columns if c.startswith(PARAM_PREFIX) and trials[c].dropna().astype(str).nunique() > 1]


def fixed_params(trials: pd.DataFrame) -> dict[str, object]:
    """The params_* columns that hold one value among these trials, as {name: value}."""
    out = {}
    for c in trials.columns:
        values = trials[c].dropna()
        if c.startswith(PARAM_PREFIX) and len(values) and values.astype(str).nunique() == 1:
            out[c[len(PARAM_PREFIX) :]] = values.iloc[0]
    return out


def most_accurate(trials: pd.DataFrame, objectives: Objectives = ()) -> pd.Series | None:
    """The finished trial with the highest val_accuracy (ties broken by the objectives, as `summary` ranks), or None."""
    frame = finished(numeric_trials(trials)).dropna(subset=["val_accuracy"])
    if frame.empty:
        return None
    others = [(m, mode) for m, mode in objectives if m != "val_accuracy"]
    keys = ["val_accuracy", *(m for m, _ in others)]
    ranked = frame.sort_values(keys, ascending=[False, *(mode == "min" for _, mode in others)], na_position="last", kind="stable")
    return ranked.iloc[0]


# ---------------------------------------------------------------------------------------------
# Parameter importance


def importance_problem(trials: pd.DataFrame, objective: tuple[str, str]) -> str | None:
    """Why parameter importance cannot be computed for `objective` on these trials, or None when it can."""
    metric, _ = objective
    frame = finished(numeric_trials(trials))
    if metric not in frame.columns:
        return f"no trial records {metric}"
    frame = frame.dropna(subset=[metric])
    if len(frame) < 2:
        return f"it needs at least 2 finished trials with {metric}, this sweep has {len(frame)}"
    if not varying_params(frame):
        return "no setting varies between the finished trials"
    if frame[metric].nunique() < 2:
        return f"every finished trial has the same {metric}"
    return None


def _distribution(values: pd.Series):
    """An Optuna distribution covering a params_* column's values: int, float (log when they span 10x), or categorical."""
    from optuna import distributions as d

    values = values.infer_objects()  # a column that also held None reads back as object
    if pd.api.types.is_bool_dtype(values) or not pd.api.types.is_numeric_dtype(values):
        return d.CategoricalDistribution(sorted({_plain(v) for v in values}, key=str))
    low, high = values.min(), values.max()
    if pd.api.types.is_integer_dtype(values):
        return d.IntDistribution(int(low), int(high))
    return d.FloatDistribution(float(low), float(high), log=bool(low > 0 and high / low >= 10))


def _plain(value):
    """A numpy scalar as the Python value Optuna expects."""
    return value.item() if isinstance(value, np.generic) else value


def param_importance(trials: pd.DataFrame, objective: tuple[str, str]) -> pd.DataFrame:
    """Which settings explain `objective`: Optuna's PED-ANOVA on a study rebuilt from the finished trials.

    Columns: param (without the params_ prefix), importance (sums to 1). Only settings that vary are
    assessed. Empty when `importance_problem` says why not. The target quantile keeps about 5 trials
    in the "good" set (10% of the trials when there are 50 or more, never more than half).
    """
    empty = pd.DataFrame({"param": pd.Series(dtype=str), "importance": pd.Series(dtype=float)})
    if importance_problem(trials, objective) is not None:
        return empty
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    metric, mode = objective
    frame = finished(numeric_trials(trials)).dropna(subset=[metric])
    columns = varying_params(frame)
    space = {c[len(PARAM_PREFIX) :]: _distribution(frame[c].dropna()) for c in columns}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
            for _, row in frame.iterrows():
                params = {c[len(PARAM_PREFIX) :]: _param_value(row[c], space[c[len(PARAM_PREFIX) :]]) for c in columns if pd.notna(row[c])}
                distributions = {k: space[k] for k in params}
                study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=float(row[metric])))
            quantile = min(0.5, max(0.1, 5 / len(frame)))
            scores = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile), normalize=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    total = sum(scores.values())
    rows = [(k, v / total if total > 0 else 0.0) for k, v in scores.items()]
    return (
        pd.DataFrame(rows, columns=["param", "importance"]).sort_values("importance", ascending=False, kind="stable").reset_index(drop=True)
    )


def _param_value(value, distribution):
    from optuna import distributions as d

    if isinstance(distribution, d.IntDistribution):
        return int(value)
    if isinstance(distribution, d.FloatDistribution):
        return float(value)
    return _plain(value)


# ---------------------------------------------------------------------------------------------
# Confusion-pair rates


def _pair_column(true: str, pred: str) -> str:
    return f"{PAIR_PREFIX}{true}_as_{pred}"


def pair_rates(confusion: pd.DataFrame, pairs: Sequence[tuple[str, str]] = ()) -> pd.DataFrame:
    """Share of true X predicted as Y for every trial in the long confusion counts: trial_id, then one pair_<X>_as_<Y> column per pair.

    The pairs: the watch list (where both classes occur), every pair some trial confused, and `pairs`.
    A trial that never confused a pair has 0; NaN only where its test split has no image of X.
    """
    # Codes and sums in arrays (bincount), not dicts keyed by cell: 10,000 trials' 7 M cells as Python tuples took GBs and minutes.
    # factorize keeps Arrow strings in Arrow: pd.Categorical(values, categories) made 7 M Python strings first (0.4 GB at 10,000 trials).
    (row, id_found), (true, true_found), (pred, pred_found) = (pd.factorize(confusion[c]) for c in ("trial_id", "true_label", "pred_label"))
    ids = sorted(id_found, key=str)
    labels = set(true_found) | set(pred_found)
    names = sorted(labels, key=str)
    row, true, pred = _recoded(row, id_found, ids), _recoded(true, true_found, names), _recoded(pred, pred_found, names)
    n = pd.to_numeric(confusion["count"], errors="coerce").fillna(0.0).to_numpy(dtype=float)
    off = (true != pred) & (n > 0)
    cells = np.unique(true[off] * len(names) + pred[off])
    wanted = [(t, p) for t, p in WATCH_PAIRS if t in labels and p in labels]
    for pair in [*sorted((names[c // len(names)], names[c % len(names)]) for c in cells), *(tuple(p) for p in pairs)]:
        if pair not in wanted:
            wanted.append(pair)
    names += sorted({c for pair in wanted for c in pair} - labels, key=str)  # asked for, never seen: no images, NaN
    code = {name: k for k, name in enumerate(names)}
    k = len(names)
    support = np.bincount(row * k + true, weights=n, minlength=len(ids) * k).reshape(len(ids), k)  # every image of X, the diagonal included
    pair_of_cell = np.full(k * k, -1)
    for j, (t, p) in enumerate(wanted):
        pair_of_cell[code[t] * k + code[p]] = j
    j = pair_of_cell[true * k + pred]
    hits = np.bincount(row[j >= 0] * len(wanted) + j[j >= 0], weights=n[j >= 0], minlength=len(ids) * len(wanted)).reshape(
        len(ids), len(wanted)
    )
    totals = support[:, [code[t] for t, _ in wanted]].reshape(len(ids), len(wanted))
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, hits / totals, np.nan)
    out = pd.DataFrame(rates, columns=[_pair_column(t, p) for t, p in wanted])
    out.insert(0, "trial_id", ids)
    return out


def _recoded(codes: np.ndarray, found, order: list) -> np.ndarray:
    """factorize's codes (positions in found) as positions in order, which holds every value found."""
    position = {value: k for k, value in enumerate(order)}
    return np.array([position[value] for value in found], dtype=np.int32)[codes] if len(codes) else np.zeros(0, dtype=np.int32)


def with_pair_rates(trials: pd.DataFrame, confusion: pd.DataFrame) -> pd.DataFrame:
    """A copy whose pair_* columns hold, for every trial with confusion counts, its rate from those counts instead of the top-five record."""
    columns = [c for c in trials.columns if _PAIR_RE.match(c)]
    out = trials.copy()
    if not columns or confusion.empty:
        return out
    rates = pair_rates(confusion, [_PAIR_RE.match(c).groups() for c in columns]).set_index("trial_id")
    counted = out["trial_id"].isin(rates.index)
    for column in columns:
        out.loc[counted, column] = out.loc[counted, "trial_id"].map(rates[column]).astype(float)
    return out


@dataclass
class PairRates:
    """The finished trials' confusion-pair rates and where they were read from."""

    rates: pd.DataFrame  # trial_id, then one pair_<X>_as_<Y> column per pair; one row per trial, in id order
    from_counts: bool  # True: every pair, from confusion.parquet; False: trials.parquet's top-five pair_* columns
    left_out: int  # finished trials without confusion counts (stopped before their test evaluation)


def finished_pair_rates(trials: pd.DataFrame, confusion: pd.DataFrame) -> PairRates:
    """Every finished trial's pair rates from its confusion counts; trials.parquet's pair_* columns only when no finished trial has counts."""
    done = finished(trials)
    counted = confusion[confusion["trial_id"].isin(done["trial_id"])]
    if len(counted):
        rates = pair_rates(counted)
        return PairRates(rates, True, int((~done["trial_id"].isin(rates["trial_id"])).sum()))
    columns = [c for c in trials.columns if _PAIR_RE.match(c)]
    rates = numeric_trials(done)[["trial_id", *columns]].dropna(subset=columns, how="all") if columns else done[["trial_id"]].iloc[0:0]
    rates = rates.sort_values("trial_id", key=lambda ids: ids.astype(str), kind="stable").reset_index(drop=True)
    return PairRates(rates, False, len(done) - len(rates))


def pair_summary(pairs: PairRates, worst: int) -> pd.DataFrame:
    """The watch-list pairs, then the `worst` others with the highest mean rate: column, pair (X->Y), mean, worst, trials (how many rates)."""
    frame = pairs.rates
    watch = [_pair_column(t, p) for t, p in WATCH_PAIRS]
    present = [c for c in watch if c in frame.columns and frame[c].notna().any()]
    # A top-five record is missing where the pair was not among the five worst, a rate between 0 and
    # those five's: ranking such a column by its mean over the trials that have it would put a pair
    # bad once first, so without counts rank by the mean with the missing rates taken as 0.
    score = frame.fillna(0.0) if not pairs.from_counts else frame
    others = [c for c in frame.columns if _PAIR_RE.match(c) and c not in watch and score[c].mean() > 0]
    others.sort(key=lambda c: (-score[c].mean(), -frame[c].max(), c))
    columns = present + others[:worst]
    return pd.DataFrame(
        {
            "column": columns,
            "pair": [c[len(PAIR_PREFIX) :].replace("_as_", "->") for c in columns],
            "mean": [float(frame[c].mean()) for c in columns],
            "worst": [float(frame[c].max()) for c in columns],
            "trials": [int(frame[c].notna().sum()) for c in columns],
        }
    )


# ---------------------------------------------------------------------------------------------
# One sweep, read and checked


@dataclass
class Sweep:
    """One sweep folder's results, as read from Parquet."""

    name: str
    folder: Path
    trials: pd.DataFrame  # numeric_trials(trials.parquet), pair_* columns recomputed from the confusion counts
    epochs: pd.DataFrame
    confusion: pd.DataFrame
    speed_label: str = "measured during training, under load"  # which speed figures trials' speed columns hold, in a few words
    speed_note: str = "measured during training, under load"  # the same, in full, for the report (analysis.speed.use_speed)


def local_results(results: Path | str, names: Sequence[str]) -> Path:
    """The folder holding the named sweeps' files on this machine: --results, or for a URI analyze's own copies of them.

    Every sweep at a URI is checked before anything is copied; reports are written beside the copies.
    """
    folders = [sweep_folder(results, name, RESULT_FILES, for_analysis=True) for name in names]
    for folder in folders:
        folder.check_present()
    for folder in folders:
        folder.pull()
    return folders[0].root


def checked_folder(results: Path, name: str) -> tuple[Path, dict[str, pd.DataFrame]]:
    """`results/name` and its tables ({file name: DataFrame}, each read once), refused in one line when it is not a sweep folder
    or holds a damaged table; what analysis does not need is noted."""
    folder = Path(results) / name
    if not is_plain_name(name) or not folder.is_dir():
        raise AslTuneError(f"{folder}: no such sweep folder")
    tables = check_for_analysis(folder, str(folder))
    return folder, {table: table_frame(table, read) for table, read in tables.items()}


def load_sweep(results: Path, name: str, objectives: Objectives) -> Sweep:
    """Read a sweep folder (pair_* rates from its confusion counts) and refuse, in one line, when it is missing, lacks an objective or has no finished trial."""
    folder, tables = checked_folder(results, name)
    confusion = tables[CONFUSION]
    trials = with_pair_rates(numeric_trials(tables[TRIALS]), confusion)
    for metric, _ in objectives:
        if metric not in trials.columns:  # only a pair_* column can be missing: numeric_trials adds the rest
            raise AslTuneError(f"--objectives: {metric} is not recorded in {folder / 'trials.parquet'}")
    done = finished(trials)
    if done.empty:
        counts = trials["status"].value_counts()
        seen = ", ".join(f"{n} {s}" for s, n in counts.items()) or "no trials yet"
        raise AslTuneError(f"{folder}: no finished trials (completed or stopped early); found {seen}")
    if done.dropna(subset=[m for m, _ in objectives]).empty:
        raise AslTuneError(f"{folder}: no finished trial has a value for every objective ({', '.join(m for m, _ in objectives)})")
    return Sweep(name, folder, trials, tables[EPOCHS], confusion)
