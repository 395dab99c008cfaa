"""The sweep's Optuna study: where it is stored (study.db, SQLite), and the searcher that keeps it in step with Tune.

Tune pickles the searcher, with its storage, into the run's experiment state, and `asl-tune resume`
unpickles it. A plain RDBStorage keeps the absolute path it was opened with; for a sweep whose
`--results` is a URI that path is a staging folder on the first driver's machine, so `SweepStudyStorage`
keeps the sweep's folder (mirror.SweepFolder) instead and finds the study in this process's copy of it
again when it is unpickled.

The study is written as events happen, Tune's experiment state about once a second, so a driver
killed in between leaves the two out of step; `StudySearch` reconciles them when Tune restores it.
"""

from __future__ import annotations

import logging
from pathlib import Path

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import RDBStorage
from optuna.trial import Trial, TrialState, create_trial
from ray.tune.search.optuna import OptunaSearch

from asl_tune.sweep.mirror import SweepFolder, as_sweep_folder

log = logging.getLogger(__name__)


TRIAL_ID_ATTR = "asl_tune_trial_id"  # user attribute of each study trial: the trial_id of its Parquet rows


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class SweepStudyStorage(RDBStorage):
    """An RDBStorage on `<sweep folder>/<study file>`, the folder worked out again where it is unpickled."""

    def __init__(self, sweep: SweepFolder, study_file: str):
        self._sweep = sweep
        self._study_file = study_file
        super().__init__(sqlite_url(sweep.path / study_file))

    def __setstate__(self, state: dict) -> None:
        state["url"] = sqlite_url(state["_sweep"].path / state["_study_file"])
        super().__setstate__(state)


def study_storage(sweep: SweepFolder | Path, study_file: str) -> RDBStorage:
    """The storage for a sweep's study: in its folder (for results at a URI, in this machine's working copy)."""
    return SweepStudyStorage(as_sweep_folder(sweep), study_file)


class StudySearch(OptunaSearch):
    """Ray's OptunaSearch, made to survive a driver killed between a study write and Tune saving its state.

    - Study ahead of Tune (it finished a trial that Tune restores as running, and re-runs from its last
      checkpoint): reports and completions for a trial the study already finished are ignored; the study
      keeps what it was told first.
    - Study behind Tune (results at a URI, where study.db is copied up after Tune's state): a completion
      Tune's state holds but the study lacks is told again from what this searcher saved with that state.
    - A trial the study started after Tune's last save (Tune forgot it): put back in the study's queue,
      so the next trial Tune asks for takes its settings, and the study ends with as many trials as Tune ran.
    """

    def _told_trials(self) -> dict[str, tuple[str, list[float] | None]]:
        # Saved with Tune's state (OptunaSearch pickles __dict__); absent in a searcher pickled before it existed.
        return self.__dict__.setdefault("_told", {})

    def _finished_ids(self) -> set[str]:
        """Tune trial ids the study has finished, as far as this searcher knows: the ones it told, and the ones
        reconcile() found finished. Kept here so a result needs no read of the study (a read of one trial in
        SQLite costs several queries, as much as the rest of the driver's work on a result; issue 15)."""
        return self.__dict__.setdefault("_finished", set())

    def suggest(self, trial_id: str):
        """Optuna's settings for a new Tune trial; the study's trial carries the asl-tune trial id (user attribute
        TRIAL_ID_ATTR), so a trial seen in optuna-dashboard can be found in the Parquet files."""
        config = super().suggest(trial_id)
        ot_trial = self._ot_trials.get(trial_id)
        if ot_trial is not None and config is not None:
            ot_trial.set_user_attr(TRIAL_ID_ATTR, trial_id)
        return config

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._finished_ids():
            log.debug("trial %s is already finished in the study; result not reported again", trial_id)
            return
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # Finished in the study by a driver this searcher was not restored from (the write itself found it
            # finished, so no read is spent on asking first): the study keeps what it was told first.
            self._finished_ids().add(trial_id)
            log.debug("trial %s is already finished in the study; result not reported", trial_id)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        """Tell the study how the trial ended, as Ray's OptunaSearch does, unless the study already finished it.

        Ray's own version runs only for a trial it already completed or never saw (it warns): otherwise Study.tell
        is called here, since it returns the study's final record of the trial, which is what is saved with Tune's
        state (see reconcile), so that no read of its own is needed. `skip_if_finished`: a trial the study finished
        first (a driver killed after telling it) keeps what it was told then.
        """
        if trial_id in self._finished_ids():
            self._completed_trials.add(trial_id)
            return
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return super().on_trial_complete(trial_id, result, error)  # Ray's warning (or error) for these
        value, state = _outcome(self.metric, result, error)
        try:
            frozen = self._ot_study.tell(self._ot_trials[trial_id], value, state=state, skip_if_finished=True)
        except Exception as exc:  # as Ray's: e.g. a NaN value; the study keeps the trial running
            log.warning(exc)
        else:
            self._told_trials()[trial_id] = (frozen.state.name, frozen.values)
            self._finished_ids().add(trial_id)
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.reconcile()

    def reconcile(self) -> dict[str, int]:
        """Bring the study in step with the Tune state this searcher was restored with; return what was done.

        The study is read once, whole (a trial at a time would be as many reads as the sweep has trials).
        """
        storage, study_id = self._ot_study._storage, self._ot_study._study_id
        # Read from study.db itself (self._storage, the RDBStorage the searcher was given), not through the study's
        # cache: that was pickled with Tune's state and may hold trials the study.db beside it never recorded.
        in_study = {frozen._trial_id: frozen for frozen in (self._storage or storage).get_all_trials(study_id, deepcopy=False)}
        done = {"recreated": 0, "requeued": 0, "retold": 0}
        for trial_id, ot_trial in list(self._ot_trials.items()):
            if ot_trial._trial_id not in in_study and trial_id not in self._completed_trials:
                # The study was copied before it recorded this trial: record it again, with the settings Tune runs.
                template = create_trial(state=TrialState.RUNNING, params=ot_trial._cached_frozen_trial.params, distributions=ot_trial._cached_frozen_trial.distributions)
                self._ot_trials[trial_id] = Trial(self._ot_study, storage.create_new_trial(study_id, template_trial=template))
                done["recreated"] += 1
        known = {t._trial_id for t in self._ot_trials.values()}
        for frozen in in_study.values():
            if frozen.state == TrialState.RUNNING and frozen._trial_id not in known:  # asked after Tune's last save: Tune will ask again
                storage.set_trial_state_values(frozen._trial_id, TrialState.WAITING)
                done["requeued"] += 1
        for trial_id, (state, values) in self._told_trials().items():
            frozen = in_study.get(self._ot_trials[trial_id]._trial_id) if trial_id in self._ot_trials else None
            if frozen is not None and not frozen.state.is_finished():
                storage.set_trial_state_values(frozen._trial_id, TrialState[state], values)
                done["retold"] += 1
        # What the study finished: a trial Tune's older state still runs reports again, and is ignored (see above).
        finished = {tid for tid, t in self._ot_trials.items() if t._trial_id in in_study and in_study[t._trial_id].state.is_finished()}
        self.__dict__["_finished"] = finished | {tid for tid in self._told_trials() if tid in self._ot_trials}
        if any(done.values()):
            log.warning("study.db was out of step with Tune's saved state: %(recreated)d trial(s) recorded again, %(requeued)d put back in the queue, %(retold)d completion(s) told again", done)
        return done


def _outcome(metric: str | list[str], result: dict | None, error: bool) -> tuple:
    """The value(s) and state Ray's OptunaSearch tells the study for a trial that ended with `result` (same rules)."""
    if not result:
        value = None
    else:
        value = [result.get(m) for m in metric] if isinstance(metric, list) else result.get(metric)
    if value is not None:
        return value, TrialState.COMPLETE
    return None, TrialState.FAIL if error else TrialState.PRUNED
