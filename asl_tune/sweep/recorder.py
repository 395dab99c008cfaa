"""The sweep's driver-side recorder: every result Tune receives lands in the sweep's Parquet files, before Tune saves its state.

Rows are keyed by trial and epoch (see results.ResultsStore), so an epoch that a resumed trial
reports again replaces its row; a flush rewrites only the parts of the trials that changed, each
atomically, so a reader or a kill never sees a torn file and the cost of a result does not grow with the
sweep. When the sweep's results are at a URI, the parts written are then copied there (mirror.SweepFolder.sync).

Results are written in batches, not one by one (issue 15: a part write per table per result was a fifth of
the driver's time): whatever arrived is flushed when Tune saves its experiment state (it asks the callbacks
for theirs first, see get_state), when the experiment ends, and at the latest FLUSH_EVERY_S after it
arrived. So the files are never behind the state a resume starts from: a SIGKILL of the driver loses only
results that came after Tune's last save, and Tune re-runs those trials from their checkpoints, which
reports them again. A trial's end waits for the flush too (issue 29): the trials that started and ended
since the last flush are then written together, one sealed part per table (results.ResultsStore.end_trial),
not four parts each.
"""

from __future__ import annotations

import dataclasses
import math
import re
import time
from datetime import datetime, timezone
from pathlib import Path

from ray.tune import Callback

from asl_tune.files import write_atomically
from asl_tune.results import ResultsStore, trial_row
from asl_tune.sweep.mirror import SweepFolder, as_sweep_folder
from asl_tune.sweep.progress import SweepProgress, restart_line
from asl_tune.sweep.request import LOGS_DIR
from asl_tune.sweep.space import SearchSpace
from asl_tune.sweep.trainable import EPOCH_ROW, NOT_TRIAL_COLUMNS, TRIAL_OUTPUT, TUNE_KEYS

# What asl-tune reads of a trial's last result once the callbacks have had it: how it ended (final_status), ASHA's
# time axis, where it ran (an errored trial's log); the searched metrics are added per sweep (DropRecordedParts).
KEPT_FOR_TUNE = ("status", "epochs_completed", "images_seen", "node_id", "hostname", "device")
# The longest a result waits in memory for its flush, should Tune save its state less often (asl-tune has it
# save every second up to 500 trials, cluster.tune_environment): how stale the files may look to a reader during a sweep.
FLUSH_EVERY_S = 1.0


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

    def __init__(self, folder: SweepFolder | Path, space: SearchSpace, total: int):
        self.sweep = as_sweep_folder(folder)  # at a URI, it copies the files there as they change (see mirror.py)
        self.space = space
        self.total = total  # trials this run of the sweep will have, for progress lines
        self._store: ResultsStore | None = None
        self._checked = False  # whether rows of trials Tune no longer knows were looked for (once per driver)
        self._unwritten_since: float | None = None  # time.monotonic() of the oldest change not yet flushed

    def __getstate__(self) -> dict:
        # Tune pickles callbacks with the experiment; a restored recorder re-reads the files instead.
        return {**self.__dict__, "_store": None, "_checked": False, "_unwritten_since": None}

    @property
    def folder(self) -> Path:
        """The sweep folder written: for results at a URI, this machine's working copy of it."""
        return self.sweep.path

    @property
    def store(self) -> ResultsStore:
        if self._store is None:
            self._store = ResultsStore(self.folder)
        return self._store

    def _params(self, trial) -> dict:
        return dataclasses.asdict(self.space.config(trial.config))

    def _put(self, trial, status: str, result: dict, error: str | None = None) -> None:
        metrics = _finite_or_nan({k: v for k, v in result.items() if k not in NOT_TRIAL_COLUMNS})
        row = trial_row(trial.trial_id, status, self._params(trial), metrics)
        if error is not None:
            row["error"] = error
        self.store.put_trial(row)

    def _flush(self) -> None:
        self.sweep.sync(changed=self.store.flush())
        self._unwritten_since = None

    def _changed(self) -> None:
        """Rows changed in memory: written with the next flush, or now if the oldest unwritten change is FLUSH_EVERY_S old."""
        if self.__dict__.get("_unwritten_since") is None:  # absent in a recorder pickled before batching
            self._unwritten_since = time.monotonic()
        self._flush_when_due()

    def _flush_when_due(self) -> None:
        since = self.__dict__.get("_unwritten_since")
        if since is not None and time.monotonic() - since >= FLUSH_EVERY_S:
            self._flush()

    def get_state(self) -> None:
        """Tune asks for this as it saves its experiment state, before that state is copied to where a resume reads
        it: flush, so the files hold every result that state holds. (The recorder keeps no state of its own in it.)"""
        if self.__dict__.get("_unwritten_since") is not None:
            self._flush()
        return None

    def on_step_begin(self, iteration, trials, **info):
        if not self.__dict__.get("_checked"):
            self._checked = True
            self._drop_forgotten(trials)

    def _drop_forgotten(self, trials) -> None:
        """Remove the rows of trials that started after Tune last saved its state and that it restored without.

        Tune runs their settings again as new trials (the study hands them out again, see study.StudySearch),
        so keeping the rows would count those trials twice. Finished trials of earlier runs are never touched.
        """
        known = {t.trial_id for t in trials}
        forgotten = [tid for tid, row in self.store.trials.items() if row["status"] == "running" and tid not in known]
        for tid in forgotten:
            self.store.drop_trial(tid)
            self.progress.event(
                f"trial {tid} started after Tune last saved its state and was not restored; its rows are removed and its settings run again"
            )
        if forgotten:
            self._flush()

    def on_step_end(self, iteration, trials, **info):
        self._flush_when_due()  # changes that no event since has flushed (Tune saves its state less often at many trials)
        # The searcher writes the study when it asks for a trial, before the trial starts: copy it up now,
        # so the study at the URI keeps up with the experiment state Tune saved there in this step.
        self.sweep.sync(changed=())
        self.progress.status(trials)

    def on_trial_start(self, iteration, trials, trial, **info):
        if trial.trial_id not in self.store.trials:
            self._put(trial, "running", {})
            self.store.put_trial({"trial_id": trial.trial_id, "started_at": _now()})
            self._changed()
            self.progress.event(f"trial {trial.trial_id} started ({self._what(trial)})")
        else:
            self.progress.event(restart_line(trial.trial_id, self._what(trial), trial.checkpoint is not None))

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if EPOCH_ROW not in result:  # not one of the trainer's reports
            return
        self.store.put_epoch(trial.trial_id, _finite_or_nan(result[EPOCH_ROW]))
        self._put(trial, "diverged" if result.get("status") == "diverged" else "running", result)
        if result.get("confusion") is not None:
            classes = [r["class_name"] for r in result["per_class"]]
            self.store.put_confusion(trial.trial_id, classes, result["confusion"])
            self.store.put_per_class(trial.trial_id, result["per_class"])
        self._changed()

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        # The newest checkpoint is the one Tune keeps longest (CheckpointConfig.num_to_keep drops the oldest).
        # Written with the next flush (at the latest when Tune saves the state that names this checkpoint).
        self.store.put_trial({"trial_id": trial.trial_id, "checkpoint": checkpoint_location(checkpoint)})
        self._changed()

    def on_experiment_end(self, trials, **info):
        self._flush()  # whatever the last events left unwritten
        self.progress.status(trials, final=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        status = final_status(result, self.space.config(trial.config).epochs)
        self._put(trial, status, result)
        self.store.put_trial({"trial_id": trial.trial_id, "ended_at": _now()})
        self.store.end_trial(
            trial.trial_id, for_good=True
        )  # written by the next flush; then its epochs, confusion and per-class rows leave memory
        self._changed()
        self._say(trials, trial, status, result)

    def on_trial_error(self, iteration, trials, trial, **info):
        text = _error_text(trial)
        message = _error_message(text)
        log = self._write_log(trial, text)
        self._put(trial, "errored", trial.last_result or {}, error=message)
        self.store.put_trial({"trial_id": trial.trial_id, "ended_at": _now(), "log": log})
        self.store.end_trial(trial.trial_id, for_good=False)  # a resume runs it again: in parts of its own
        self._changed()
        self._say(trials, trial, "errored", {}, f"{message}; its log: {self.sweep.path / log}" if log else message)

    def _write_log(self, trial, text: str) -> str | None:
        """logs/<trial id>.log in the sweep folder: the trial's settings, where it ran, its traceback and output; its path relative to the folder."""
        settings = dataclasses.asdict(self.space.config(trial.config))
        where = {k: (trial.last_result or {}).get(k) for k in ("node_id", "hostname", "device")}
        header = [f"trial {trial.trial_id}", f"settings: {settings}", f"ran on: {where}", ""]
        relative = f"{LOGS_DIR}/{trial.trial_id}.log"
        try:
            (self.sweep.path / LOGS_DIR).mkdir(parents=True, exist_ok=True)
            write_atomically(
                self.sweep.path / relative,
                lambda tmp: Path(tmp).write_text(
                    "\n".join(header) + (text or "Ray kept no traceback (the worker may have been killed).\n")
                ),
            )
        except OSError:
            return None  # the row and the driver's line still carry the error itself
        return relative

    def _what(self, trial) -> str:
        cfg = self.space.config(trial.config)
        return f"head {cfg.head_width}, lr {cfg.lr:.3g}, {cfg.epochs} epochs, {cfg.data_fraction:.0%} of the data"

    def _say(self, trials, trial, status: str, result: dict, message: str = "") -> None:
        done = sum(1 for t in trials if t.is_finished()) + (0 if trial.is_finished() else 1)
        score = result.get(self.space.metric)
        shown = f"{self.space.metric} {score:.4f}" if isinstance(score, float) and math.isfinite(score) else message
        self.progress.event(f"[{done}/{self.total}] trial {trial.trial_id} {status.replace('_', ' ')}: {shown} ({self._what(trial)})")

    @property
    def progress(self) -> SweepProgress:
        if self.__dict__.get("_progress") is None:  # also for a recorder pickled before it had one
            self._progress = SweepProgress(self.total, self.space.metric, self.space.mode)
        return self._progress


class DropRecordedParts(Callback):
    """The last of a sweep's callbacks: takes out of each result what only the files need, once the recorder and
    the trackers have had it. Tune keeps the searched metrics, how the trial ended, ASHA's time axis, where it
    ran and its own keys (TUNE_KEYS, KEPT_FOR_TUNE).

    Tune keeps every trial's last result, with running statistics of each number in it, for the whole sweep:
    in the driver's memory and in every save of its state (bench/RESULTS.md section 8: `tune_trial_kb`). Tune lets
    callbacks change the result in place, and stores it as the trial's last after them; the searcher and the
    scheduler got the whole result before the callbacks, and read only the kept keys of the last one at the
    trial's end. The trackers keep their own copy of a running trial's final figures (tracking.LastFigures).
    """

    def __init__(self, space: SearchSpace):
        self.kept = frozenset({space.metric, *(m for m, _ in space.objectives), *KEPT_FOR_TUNE}) | TUNE_KEYS

    def on_trial_result(self, iteration, trials, trial, result, **info):
        for key in [k for k in result if k not in self.kept]:
            del result[key]


# pyarrow filesystem type -> URI scheme, for checkpoints Ray keeps off this machine (--storage, results at a URI)
_SCHEMES = {"s3": "s3", "gcs": "gs", "hdfs": "hdfs", "abfs": "abfs"}


def checkpoint_location(checkpoint) -> str:
    """The folder of a Tune checkpoint (it holds the trainer's checkpoint.pt): a local path, or a URI for object storage."""
    path = checkpoint.path.rstrip("/")
    kind = checkpoint.filesystem.type_name
    return path if kind == "local" else f"{_SCHEMES.get(kind, kind)}://{path}"


def _error_text(trial) -> str:
    """What Ray kept of a failed trial: its traceback, then (see trainable.TRIAL_OUTPUT) its own output; "" when none."""
    path = getattr(trial, "error_file", None)
    try:
        return Path(path).read_text() if path else ""
    except OSError:
        return ""


_OOM_KILL = re.compile(r"worker\(s\) were killed due to the node running low on memory")
_OOM_USED = re.compile(r"was ([\d.]+\s*GB used / [\d.]+\s*GB limit)")


def _error_message(text: str) -> str:
    """The last line of the trial's last traceback (its exception), or a generic note when Ray kept none.

    Ray's error file holds one "Failure # N" section per try: a traceback, then the trial's own output.
    """
    lines, in_output = [], False
    if (oom := _OOM_KILL.search(text)) is not None:  # Ray's memory monitor: its message runs to 60 lines of statistics
        last = text[oom.start() :]
        used = _OOM_USED.search(last)
        return f"killed by Ray's memory monitor: its node ran low on memory ({used.group(1) if used else 'see its log'})"
    for line in text.splitlines():
        if line.startswith(TRIAL_OUTPUT) or line.startswith("Failure # "):
            in_output = line.startswith(TRIAL_OUTPUT)
        elif line.strip() and not in_output:
            lines.append(line.strip())
    return lines[-1] if lines else "the trial failed without an error message (its worker may have been killed)"


def _now() -> str:
    """The driver's clock, as trials.parquet's started_at and ended_at record it (ISO 8601, UTC)."""
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")
