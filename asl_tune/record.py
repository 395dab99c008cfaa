"""The sweep's driver-side recorder: every result Tune receives lands in the sweep's Parquet files at once.

Rows are keyed by trial and epoch (see results.ResultsStore), so an epoch that a resumed trial
reports again replaces its row; every file is rewritten atomically, so a reader or a kill never
sees a torn file.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path

from ray.tune import Callback

from asl_tune.results import ResultsStore, trial_row
from asl_tune.space import SearchSpace


def _finite_or_nan(metrics: dict) -> dict:
    """Undo the searcher's stand-in: a non-finite metric is stored as NaN (missing), never as +-inf."""
    return {k: (math.nan if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}


def final_status(result: dict, planned_epochs: int) -> str:
    """How a trial that Tune calls complete ended: diverged, stopped early by ASHA, or completed."""
    if result.get("status") == "diverged":
        return "diverged"
    return "stopped_early" if int(result.get("epochs_completed") or 0) < planned_epochs else "completed"


class ParquetRecorder(Callback):
    """A Tune callback that writes trials/epochs/confusion/per_class Parquet in the sweep folder."""

    def __init__(self, folder: Path, space: SearchSpace, total: int):
        self.folder = Path(folder)
        self.space = space
        self.total = total  # trials this run of the sweep will have, for progress lines
        self._store: ResultsStore | None = None

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with the experiment; a restored recorder re-reads the files instead.
        return {**self.__dict__, "_store": None}

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.folder)
        return self._store

    def _params(self, trial) -> dict:
        return dataclasses.asdict(self.space.config(trial.config))

    def _put(self, trial, status: str, result: dict, error: str | None = None) -> None:
        metrics = _finite_or_nan({k: v for k, v in result.items() if k not in ("confusion", "per_class")})
        row = trial_row(trial.trial_id, status, self._params(trial), metrics)
        if error is not None:
            row["error"] = error
        self.store.put_trial(row)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.store.trials:
            self._put(trial, "running", {})
            self.store.flush()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return
        clean = _finite_or_nan(result)
        self.store.put_epoch(trial.trial_id, clean)
        self._put(trial, "diverged" if result.get("status") == "diverged" else "running", result)
        if result.get("confusion") is not None:
            classes = [r["class_name"] for r in result["per_class"]]
            self.store.put_confusion(trial.trial_id, classes, result["confusion"])
            self.store.put_per_class(trial.trial_id, result["per_class"])
        self.store.flush()

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = final_status(result, self.space.config(trial.config).epochs)
        self._put(trial, status, result)
        self.store.flush()
        self._say(trials, trial, status, result)

    def on_trial_error(self, iteration, trials, trial, **info):
        message = _error_message(trial)
        self._put(trial, "errored", trial.last_result or {}, error=message)
        self.store.flush()
        self._say(trials, trial, "errored", {}, message)

    def _say(self, trials, trial, status: str, result: dict, message: str = "") -> None:
        done = sum(1 for t in trials if t.is_finished()) + (0 if trial.is_finished() else 1)
        cfg = self.space.config(trial.config)
        what = f"head {cfg.head_width}, lr {cfg.lr:.3g}, {cfg.epochs} epochs, {cfg.data_fraction:.0%} of the data"
        score = result.get(self.space.metric)
        shown = f"{self.space.metric} {score:.4f}" if isinstance(score, float) and math.isfinite(score) else message
        print(f"[{done}/{self.total}] trial {trial.trial_id} {status.replace('_', ' ')}: {shown} ({what})", file=sys.stderr, flush=True)


def _error_message(trial) -> str:
    """The last line of the trial's traceback (its exception), or a generic note when Ray kept none."""
    path = getattr(trial, "error_file", None)
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines() if ln.strip()] if path else []
    except OSError:
        lines = []
    return lines[-1] if lines else "the trial failed without an error message (its worker may have been killed)"
