"""The only module that writes or reads Parquet: one row per trial, per epoch, per confusion cell, per class.

Every write goes to a temporary file beside the target and is renamed over it (files.write_atomically),
so a reader (or a crash) only ever sees a whole file, old or new, never a torn one.
"""

from __future__ import annotations

import errno
import io
from pathlib import Path

import pandas as pd

from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically

TRIALS = "trials.parquet"
EPOCHS = "epochs.parquet"
CONFUSION = "confusion.parquet"
PER_CLASS = "per_class.parquet"
RESULT_FILES = (TRIALS, EPOCHS, CONFUSION, PER_CLASS)

PARAM_PREFIX = "params_"  # settings columns, as Optuna's trials_dataframe names them
PAIR_PREFIX = "pair_"  # pair_<X>_as_<Y>: share of true X predicted as Y on the test split
STATUSES = ("completed", "stopped_early", "diverged", "errored", "running")
FINISHED = ("completed", "stopped_early")  # trials whose accuracy can be compared
FRAME_BUDGET_MS = 1000 / 30  # keeps_up_30fps: batch-1 latency p95 within one frame of 30 fps video

TRIAL_COLUMNS = [
    "trial_id",
    "status",
    "val_accuracy",
    "test_accuracy",
    "external_accuracy",
    "train_img_per_s",
    "infer_img_per_s",
    "latency_ms_p50",
    "latency_ms_p95",
    "keeps_up_30fps",
    "n_parameters",
    "flops_per_image",
    "epochs_completed",
    "images_seen",
    "train_seconds",
    "peak_rss_mb",
    "node_id",
    "hostname",
    "device",
    "precision",
    "started_at",
    "ended_at",
    "checkpoint",
    "error",
    "log",
]
EPOCH_COLUMNS = ["trial_id", "epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "train_img_per_s", "images_seen", "seconds"]
CONFUSION_COLUMNS = ["trial_id", "true_label", "pred_label", "count"]
PER_CLASS_COLUMNS = ["trial_id", "class_name", "support", "precision", "recall", "fpr", "fnr"]
METRICS = [c for c in TRIAL_COLUMNS if c not in ("trial_id", "status", "node_id", "hostname", "device", "precision", "started_at", "ended_at", "checkpoint", "error", "log", "keeps_up_30fps")]


def is_plain_name(name: str) -> bool:
    """Whether `name` can name a sweep: one folder inside the results folder (not empty, no '/', no leading '.')."""
    return bool(name) and "/" not in name and not name.startswith(".")


def trial_row(trial_id: str, status: str, params: dict, metrics: dict, **where: str) -> dict:
    """One flat trials.parquet row: the trial's settings as params_<name>, its metrics and pair rates, and where it ran."""
    row = {c: None for c in TRIAL_COLUMNS}
    row.update({k: v for k, v in metrics.items() if k in TRIAL_COLUMNS or k.startswith(PAIR_PREFIX)})
    row.update(where)
    row.update({f"{PARAM_PREFIX}{k}": v for k, v in params.items()})
    row["trial_id"], row["status"] = trial_id, status
    return row


def write_atomic(df: pd.DataFrame, path: Path) -> None:
    """Write df to path as Parquet through a temporary file and a rename; on failure the old file stays whole."""
    path = Path(path)

    def refused(e: OSError) -> AslTuneError:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return AslTuneError(f"results: cannot write {path}: {why}; the previous file is left intact")

    write_atomically(path, lambda tmp: df.to_parquet(tmp, index=False), error=refused)


def read_snapshot(path: Path) -> pd.DataFrame:
    """One Parquet file as it was at one instant, even while a writer replaces it.

    Parquet readers open a file more than once (footer, then pages); were it replaced in between,
    they would mix two versions. One open() pins one version, so read it whole, then parse.
    """
    with open(path, "rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))


def _read(folder: Path, name: str, columns: list[str]) -> pd.DataFrame:
    path = Path(folder) / name
    try:
        return read_snapshot(path)
    except FileNotFoundError:
        return pd.DataFrame(columns=columns)


def read_trials(folder: Path) -> pd.DataFrame:
    """trials.parquet of a sweep (or one `train --out`) folder; empty frame when none yet."""
    return _read(folder, TRIALS, TRIAL_COLUMNS)


def read_epochs(folder: Path) -> pd.DataFrame:
    """epochs.parquet: one row per (trial_id, epoch)."""
    return _read(folder, EPOCHS, EPOCH_COLUMNS)


def read_confusion(folder: Path) -> pd.DataFrame:
    """confusion.parquet: test-split counts per (trial_id, true_label, pred_label)."""
    return _read(folder, CONFUSION, CONFUSION_COLUMNS)


def confusion_counts(rows: pd.DataFrame, classes: list[str] | tuple[str, ...]) -> "np.ndarray":
    """(K, K) counts, row = true class, from one trial's confusion.parquet rows (the inverse of put_confusion's long form)."""
    import numpy as np

    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for true, pred, count in zip(rows["true_label"], rows["pred_label"], rows["count"]):
        if true in index and pred in index:
            matrix[index[true], index[pred]] += int(count)
    return matrix


def read_per_class(folder: Path) -> pd.DataFrame:
    """per_class.parquet: precision, recall, fpr, fnr per (trial_id, class_name)."""
    return _read(folder, PER_CLASS, PER_CLASS_COLUMNS)


class ResultsStore:
    """The results of one sweep folder, kept in memory and rewritten whole on flush.

    Rows are keyed (trial_id; trial_id+epoch; ...), so a result that arrives twice, as it
    does after a resume re-runs an epoch, replaces the earlier row instead of duplicating it.
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.trials: dict[str, dict] = {}
        self.epochs: dict[tuple[str, int], dict] = {}
        self.confusion: dict[str, list[dict]] = {}
        self.per_class: dict[str, list[dict]] = {}
        self._dirty: set[str] = set()
        for row in read_trials(self.folder).to_dict("records"):
            self.trials[row["trial_id"]] = row
        for row in read_epochs(self.folder).to_dict("records"):
            self.epochs[(row["trial_id"], int(row["epoch"]))] = row
        for name, target in ((CONFUSION, self.confusion), (PER_CLASS, self.per_class)):
            df = _read(self.folder, name, [])
            for tid, group in (df.groupby("trial_id") if len(df) else []):
                target[tid] = group.to_dict("records")

    def put_trial(self, row: dict) -> None:
        """Insert or replace a trial's row (keeps columns it already had that row lacks)."""
        old = self.trials.get(row["trial_id"], {})
        self.trials[row["trial_id"]] = {**old, **{k: v for k, v in row.items() if v is not None or k not in old}}
        self._dirty.add(TRIALS)

    def put_epoch(self, trial_id: str, metrics: dict) -> None:
        """Insert or replace one epoch's row of a trial."""
        row = {"trial_id": trial_id, **{c: metrics.get(c) for c in EPOCH_COLUMNS[1:]}}
        row["epoch"] = int(row["epoch"])
        self.epochs[(trial_id, row["epoch"])] = row
        self._dirty.add(EPOCHS)

    def put_confusion(self, trial_id: str, classes: list[str], matrix: list[list[int]]) -> None:
        """Replace a trial's confusion counts, stored long: one row per (true, predicted) cell with a non-zero count."""
        self.confusion[trial_id] = [
            {"trial_id": trial_id, "true_label": classes[t], "pred_label": classes[p], "count": int(n)}
            for t, row in enumerate(matrix)
            for p, n in enumerate(row)
            if n
        ]
        self._dirty.add(CONFUSION)

    def put_per_class(self, trial_id: str, rows: list[dict]) -> None:
        """Replace a trial's per-class precision/recall rows."""
        self.per_class[trial_id] = [{"trial_id": trial_id, **r} for r in rows]
        self._dirty.add(PER_CLASS)

    def drop_trial(self, trial_id: str) -> None:
        """Remove every row of a trial from every file."""
        if self.trials.pop(trial_id, None) is not None:
            self._dirty.add(TRIALS)
        for key in [k for k in self.epochs if k[0] == trial_id]:
            del self.epochs[key]
            self._dirty.add(EPOCHS)
        for name, rows in ((CONFUSION, self.confusion), (PER_CLASS, self.per_class)):
            if rows.pop(trial_id, None) is not None:
                self._dirty.add(name)

    def trial_status(self, trial_id: str) -> str | None:
        """The stored status of a trial, or None when it has no row."""
        row = self.trials.get(trial_id)
        return None if row is None else row["status"]

    def flush(self) -> None:
        """Rewrite every file that changed since the last flush, each atomically."""
        self.folder.mkdir(parents=True, exist_ok=True)
        frames = {
            TRIALS: lambda: _ordered(pd.DataFrame(list(self.trials.values())), TRIAL_COLUMNS),
            EPOCHS: lambda: pd.DataFrame(sorted(self.epochs.values(), key=lambda r: (r["trial_id"], r["epoch"])), columns=EPOCH_COLUMNS),
            CONFUSION: lambda: pd.DataFrame([r for rows in self.confusion.values() for r in rows], columns=CONFUSION_COLUMNS),
            PER_CLASS: lambda: pd.DataFrame([r for rows in self.per_class.values() for r in rows], columns=PER_CLASS_COLUMNS),
        }
        for name in sorted(self._dirty):
            write_atomic(frames[name](), self.folder / name)
        self._dirty.clear()


def _ordered(df: pd.DataFrame, first: list[str]) -> pd.DataFrame:
    """Known columns first in their fixed order, then params_*, then pair_* columns, each sorted."""
    for c in first:
        if c not in df.columns:
            df[c] = None
    params = sorted(c for c in df.columns if c.startswith(PARAM_PREFIX))
    pairs = sorted(c for c in df.columns if c.startswith(PAIR_PREFIX))
    rest = [c for c in df.columns if c not in first and c not in params and c not in pairs]
    return df[first + params + pairs + rest].sort_values("trial_id", kind="stable").reset_index(drop=True)



def save_trial(folder: Path, result, trial_id: str | None = None, checkpoint: str | None = None, **where: str) -> Path:
    """Write one trial's TrialResult (from `asl-tune train`) in the sweep's format; return the folder."""
    import time

    trial_id = trial_id or time.strftime("train-%Y%m%d-%H%M%S")
    store = ResultsStore(folder)
    params = {k: getattr(result.config, k) for k in result.config.__dataclass_fields__}
    store.put_trial({**trial_row(trial_id, result.status, params, result.final, **where), "checkpoint": checkpoint})
    for row in result.epochs:
        store.put_epoch(trial_id, row)
    if result.confusion is not None:
        store.put_confusion(trial_id, result.classes, result.confusion)
        store.put_per_class(trial_id, result.per_class)
    store.flush()
    return Path(folder)
