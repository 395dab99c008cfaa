"""Each trial, for the trackers people already use: TensorBoard event files (--tensorboard) and MLflow runs (--mlflow URI).

Both are Tune callbacks on the driver, off by default, beside the Parquet recorder (which stays the record).
Each epoch's own figures (epochs.parquet's row: losses, accuracies, img/s) are logged at step = the epoch;
when a trial ends, its final metrics (trials.parquet's numbers: test accuracy, pair rates, speed, size) are
logged once more under their own names, and MLflow gets the trial's settings as params.

- TensorBoard: one folder per trial under RESULTS/NAME/tensorboard/, so `tensorboard --logdir results/NAME`
  shows every trial. Written with tensorboardX, which ray[tune] already installs.
- MLflow: an experiment named after the sweep, a run per trial named by its trial id and tagged with it
  (TRIAL_ID_TAG), so a run can be found in the Parquet files; a resumed trial logs to the run it had.
  Needs `pip install 'asl-tune[mlflow]'` (mlflow-skinny: a tracking server or a file store;
  `sqlite:///` stores need the full `mlflow` package).

Re-reported epochs (a trial resumed from its checkpoint) are logged again at the same step.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ray.tune import Callback

from asl_tune.errors import AslTuneError
from asl_tune.sweep import progress
from asl_tune.sweep.space import SearchSpace
from asl_tune.sweep.trainable import EPOCH_ROW, NOT_TRIAL_COLUMNS, TUNE_KEYS

TENSORBOARD_DIR = "tensorboard"
TRIAL_ID_TAG = "asl_tune_trial_id"
SWEEP_TAG = "asl_tune_sweep"
FINAL = "final/"  # prefix of a trial's final metrics, apart from the per-epoch curves of the same names


def _number(value) -> float | None:
    """A finite float of a logged value, or None (text, flags, NaN: a diverged trial's loss has no point to plot)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def epoch_scalars(result: dict) -> tuple[int, dict[str, float]] | None:
    """(epoch, its own figures) of a result, or None for a result with no epoch row."""
    row = result.get(EPOCH_ROW)
    if not isinstance(row, dict) or "epoch" not in row:
        return None
    figures = {k: _number(v) for k, v in row.items() if k != "epoch"}
    return int(row["epoch"]), {k: v for k, v in figures.items() if v is not None}


def final_scalars(result: dict) -> dict[str, float]:
    """A finished trial's numeric metrics (its trials.parquet row's numbers), under FINAL."""
    figures = {k: _number(v) for k, v in result.items() if k not in TUNE_KEYS and k not in NOT_TRIAL_COLUMNS}
    return {FINAL + k: v for k, v in figures.items() if v is not None}


class LastFigures:
    """Each running trial's final figures (final_scalars) and epochs from the latest result a tracker saw. Tune
    keeps only part of a result as the trial's last (recorder.DropRecordedParts), so the trackers keep their own
    until the trial ends; a trial this driver saw no result of (Tune restored it ended) falls back to Tune's."""

    def __init__(self) -> None:
        self._by_trial: dict[str, tuple[dict[str, float], int]] = {}

    def saw(self, trial, result: dict) -> None:
        if epoch_scalars(result) is not None:  # one of the trainer's reports
            self._by_trial[trial.trial_id] = (final_scalars(result), int(result.get("epochs_completed") or 0))

    def ended(self, trial) -> tuple[dict[str, float], int]:
        kept = self._by_trial.pop(trial.trial_id, None)
        if kept is None:
            result = trial.last_result or {}
            kept = (final_scalars(result), int(result.get("epochs_completed") or 0))
        return kept


def _last(tracker) -> LastFigures:
    """A tracker's LastFigures (also for one pickled before it had them)."""
    return tracker.__dict__.setdefault("_last", LastFigures())


def _params(space: SearchSpace, trial) -> dict[str, str]:
    return {k: str(v) for k, v in dataclasses.asdict(space.config(trial.config)).items()}


class TensorBoardTrials(Callback):
    """Per-epoch figures and final metrics of each trial as TensorBoard event files under FOLDER/tensorboard/TRIAL_ID/."""

    def __init__(self, folder: Path, space: SearchSpace):
        self.root = Path(folder) / TENSORBOARD_DIR
        self.space = space
        self._writers: dict = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_writers": {}}  # Tune pickles callbacks; a restored one opens new event files

    def _writer(self, trial):
        from tensorboardX import SummaryWriter

        if trial.trial_id not in self._writers:
            self._writers[trial.trial_id] = SummaryWriter(str(self.root / trial.trial_id), flush_secs=5)
        return self._writers[trial.trial_id]

    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        params = _params(self.space, trial)
        self._writer(trial).add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(params.items())), 0)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        _last(self).saw(trial, result)
        scalars = epoch_scalars(result)
        if scalars is None:
            return
        epoch, figures = scalars
        writer = self._writer(trial)
        for key, value in figures.items():
            writer.add_scalar(key, value, epoch)
        writer.flush()  # a reader sees each epoch as it lands, as it does in the Parquet files

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        figures, epochs = _last(self).ended(trial)
        writer = self._writer(trial)
        for key, value in figures.items():
            writer.add_scalar(key, value, epochs)
        self._close(trial)

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        _last(self).ended(trial)
        self._close(trial)

    def _close(self, trial) -> None:
        writer = self._writers.pop(trial.trial_id, None)
        if writer is not None:
            writer.close()

    def on_experiment_end(self, trials: list, **info) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()


def _mlflow():
    try:
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise AslTuneError(
            "--mlflow: MLflow is not installed; pip install 'asl-tune[mlflow]' (or the full `mlflow` package for sqlite:/// stores)"
        ) from None
    return MlflowClient


@contextmanager
def _quick_http() -> Iterator[None]:
    """MLflow's HTTP retries bounded for the block: a tracking server that is down is reported in seconds, not minutes."""
    settings = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for k, v in before.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def check_mlflow(uri: str, experiment: str):
    """An MLflow client for `uri` and the id of the experiment there (created if new); any refusal is one
    AslTuneError line, so the sweep checks it before it starts."""
    client_type = _mlflow()
    try:
        with _quick_http():
            client = client_type(uri)
            found = client.get_experiment_by_name(experiment)
            return client, found.experiment_id if found is not None else client.create_experiment(experiment)
    except Exception as e:  # MLflow's errors have no common base below Exception (MlflowException, requests', OSError)
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise AslTuneError(f"--mlflow: cannot log to the MLflow tracking URI {uri!r}: {first}") from None


class MlflowTrials(Callback):
    """Each trial as an MLflow run in the experiment named after the sweep: params, per-epoch metrics, final metrics, its end."""

    def __init__(self, uri: str, sweep_name: str, space: SearchSpace):
        self.uri = uri
        self.sweep_name = sweep_name
        self.space = space
        self._client = None
        self._experiment_id: str | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._failed: set[str] = set()  # trials whose logging failed (told once each)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_client": None, "_experiment_id": None, "_runs": {}, "_failed": set()}

    @property
    def client(self):
        if self._client is None:
            self._client, self._experiment_id = check_mlflow(self.uri, self.sweep_name)
        return self._client

    def _run_id(self, trial) -> str:
        """The trial's run: the one it already has (a resumed trial, a restarted driver), else a new one."""
        if trial.trial_id not in self._runs:
            client = self.client
            found = client.search_runs([self._experiment_id], filter_string=f"tags.{TRIAL_ID_TAG} = '{trial.trial_id}'", max_results=1)
            if found:
                self._runs[trial.trial_id] = found[0].info.run_id
            else:
                tags = {TRIAL_ID_TAG: trial.trial_id, SWEEP_TAG: self.sweep_name}
                self._runs[trial.trial_id] = client.create_run(self._experiment_id, tags=tags, run_name=trial.trial_id).info.run_id
        return self._runs[trial.trial_id]

    def _log(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if metrics:
            self.client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    # Tune's hooks: MLflow holds a copy of what the Parquet files hold, so a failure to log (a tracking server
    # down, a run deleted) is told once per trial and the sweep goes on.
    def on_trial_start(self, iteration: int, trials: list, trial, **info) -> None:
        self._tolerate(trial, self._start, trial)

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info) -> None:
        _last(self).saw(trial, result)
        self._tolerate(trial, self._result, trial, result)

    def on_trial_complete(self, iteration: int, trials: list, trial, **info) -> None:
        self._tolerate(trial, self._end, trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial, **info) -> None:
        self._tolerate(trial, self._end, trial, "FAILED")

    def _tolerate(self, trial, step, *args) -> None:
        try:
            step(*args)
        except Exception as e:  # MLflow's errors have no common base below Exception
            if trial.trial_id not in self._failed:
                self._failed.add(trial.trial_id)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
                progress.announce(
                    f"--mlflow: trial {trial.trial_id} is not fully logged to {self.uri} ({first}); the Parquet files have it all, and the sweep goes on"
                )

    def _start(self, trial) -> None:
        from mlflow.entities import Param

        run_id = self._run_id(trial)
        known = self.client.get_run(run_id).data.params
        fresh = [Param(k, v) for k, v in _params(self.space, trial).items() if k not in known]
        if fresh:
            self.client.log_batch(run_id, params=fresh)
        self.client.update_run(run_id, status="RUNNING")  # a resumed trial's run was left FAILED or unfinished

    def _result(self, trial, result: dict) -> None:
        scalars = epoch_scalars(result)
        if scalars is not None:
            self._log(self._run_id(trial), scalars[1], scalars[0])

    def _end(self, trial, status: str) -> None:
        figures, epochs = _last(self).ended(trial)
        run_id = self._run_id(trial)
        if status == "FINISHED":
            self._log(run_id, figures, epochs)
        self.client.set_terminated(run_id, status)


def callbacks(folder: Path, space: SearchSpace, sweep_name: str, tensorboard: bool, mlflow: str | None) -> list:
    """The trackers a sweep asked for, as Tune callbacks."""
    found: list = []
    if tensorboard:
        found.append(TensorBoardTrials(folder, space))
    if mlflow:
        found.append(MlflowTrials(mlflow, sweep_name, space))
    return found
