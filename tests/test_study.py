"""The searcher keeps the Optuna study (real SQLite) in step with Tune's saved state across a killed driver.

Each test stands in for one ordering of "the study was written" and "Tune saved its state (and the
searcher's)" that a SIGKILL can leave behind; `save` is what Tune calls when it saves its state, and
`restore` what `asl-tune resume` calls through Tuner.restore.
"""

from __future__ import annotations

import shutil

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from asl_tune.sweep.study import StudySearch, study_storage

SPACE = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "head_width": CategoricalDistribution([16, 32])}


def searcher(folder) -> StudySearch:
    return StudySearch(space=SPACE, metric="val_accuracy", mode="max", sampler=optuna.samplers.RandomSampler(seed=0), study_name="s", storage=study_storage(folder, "study.db"))


def restored(folder, saved) -> StudySearch:
    """A searcher as Tuner.restore rebuilds it from the state saved at `saved`."""
    fresh = searcher(folder)
    fresh.restore(str(saved))
    return fresh


def study_trials(folder) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="s", storage=study_storage(folder, "study.db")).get_trials(deepcopy=False)


def result(value: float, step: int) -> dict:
    return {"val_accuracy": value, "training_iteration": step}


def test_reports_for_a_trial_the_study_already_finished_are_ignored(tmp_path):
    """Study ahead: it finished the trial, Tune's older state re-runs the last epoch and reports it again."""
    search = searcher(tmp_path)
    search.suggest("t1")
    search.on_trial_result("t1", result(0.5, 1))
    study = optuna.load_study(study_name="s", storage=study_storage(tmp_path, "study.db"))
    study.tell(study.get_trials()[0].number, 0.7)  # what the driver told before it was killed
    search.on_trial_result("t1", result(0.6, 2))  # Ray's OptunaSearch raises UpdateFinishedTrialError here
    search.on_trial_complete("t1", result(0.9, 2))
    (trial,) = study_trials(tmp_path)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.7  # the study keeps what it was told first
    assert trial.intermediate_values == {1: 0.5}


def test_a_trial_the_study_started_after_tunes_last_save_is_handed_out_again(tmp_path):
    """Tune forgot a trial the study started: its settings go to the next trial Tune asks for, not a new draw."""
    search = searcher(tmp_path)
    search.suggest("t1")
    search.save(str(tmp_path / "searcher.pkl"))  # Tune saves its state here ...
    orphan = search.suggest("t2")  # ... and the driver dies after this ask
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    assert [t.state for t in study_trials(tmp_path)] == [TrialState.RUNNING, TrialState.WAITING]
    assert again.suggest("t3") == orphan
    again.on_trial_complete("t3", result(0.4, 1))
    again.on_trial_complete("t1", result(0.3, 1))
    trials = study_trials(tmp_path)
    assert len(trials) == 2 and [t.value for t in trials] == [0.3, 0.4]


def test_a_completion_the_study_lost_is_told_again_from_tunes_saved_state(tmp_path):
    """Study behind: a copy of study.db from before the trial finished, with Tune's state from after."""
    search = searcher(tmp_path)
    search.suggest("t1")
    shutil.copy(tmp_path / "study.db", tmp_path / "older.db")
    search.on_trial_complete("t1", result(0.8, 3))
    search.save(str(tmp_path / "searcher.pkl"))
    shutil.copy(tmp_path / "older.db", tmp_path / "study.db")
    assert [t.state for t in study_trials(tmp_path)] == [TrialState.RUNNING]
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    (trial,) = study_trials(tmp_path)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.8
    assert again.reconcile() == {"recreated": 0, "requeued": 0, "retold": 0}  # in step now: nothing more to do


def test_a_trial_the_study_never_recorded_is_recorded_with_the_settings_tune_runs(tmp_path):
    """Study behind by a whole trial: a copy of study.db from before Tune's running trial was asked for."""
    search = searcher(tmp_path)
    search.suggest("t0")
    search.on_trial_complete("t0", result(0.2, 1))
    shutil.copy(tmp_path / "study.db", tmp_path / "older.db")
    settings = search.suggest("t1")
    search.save(str(tmp_path / "searcher.pkl"))
    shutil.copy(tmp_path / "older.db", tmp_path / "study.db")
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    again.on_trial_result("t1", result(0.5, 1))
    again.on_trial_complete("t1", result(0.6, 2))
    trials = study_trials(tmp_path)
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[1].params == settings and trials[1].value == 0.6 and trials[1].intermediate_values == {1: 0.5}


@pytest.mark.parametrize("error", [False, True])
def test_a_searcher_in_step_with_the_study_changes_nothing_when_restored(tmp_path, error):
    search = searcher(tmp_path)
    search.suggest("t1")
    search.on_trial_complete("t1", None if error else result(0.5, 1), error=error)
    search.save(str(tmp_path / "searcher.pkl"))
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    assert again.reconcile() == {"recreated": 0, "requeued": 0, "retold": 0}
    (trial,) = study_trials(tmp_path)
    assert trial.state == (TrialState.FAIL if error else TrialState.COMPLETE)


def test_a_result_reads_nothing_from_the_study_and_a_trial_it_finished_first_is_known_without_a_read(tmp_path, monkeypatch):
    """A count, not a timing: a result costs the study one write (its intermediate value) and no read, also after a
    restore from a Tune state older than the study (the study's finished trials are learned once, by reconcile)."""
    search = searcher(tmp_path)
    search.suggest("t1")
    search.suggest("t2")
    search.save(str(tmp_path / "searcher.pkl"))
    search.on_trial_complete("t1", result(0.7, 1))  # the study goes ahead of the state Tune saved
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    reads = []
    for name in ("get_trial", "_get_trials", "get_all_trials"):
        real = getattr(again._storage, name)
        monkeypatch.setattr(again._storage, name, lambda *a, _real=real, _name=name, **k: reads.append(_name) or _real(*a, **k))
    again.on_trial_result("t1", result(0.6, 2))  # re-run from its checkpoint by Tune; the study keeps what it had
    for step in (1, 2, 3):
        again.on_trial_result("t2", result(0.1 * step, step))
    assert reads == []
    t1, t2 = study_trials(tmp_path)
    assert t1.value == 0.7 and t1.intermediate_values == {} and t2.intermediate_values == {1: 0.1, 2: 0.2, 3: 0.30000000000000004}
