"""The searcher keeps the Optuna study (its real journal file, study.log) in step with Tune's saved state across a killed driver.

Each test stands in for one ordering of "the study was written" and "Tune saved its state (and the
searcher's)" that a SIGKILL can leave behind; `save` is what Tune calls when it saves its state (the
journal writes what it holds first), `flush` what the journal does at the latest a second after a change,
and `restore` what `asl-tune resume` calls through Tuner.restore. A sweep made before study.log keeps its
SQLite study.db: the orderings are run on that layout too.
"""

from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from asl_tune.sweep import study
from asl_tune.sweep.mirror import as_sweep_folder
from asl_tune.sweep.study import StudySearch, SweepJournal, SweepStudyStorage, flush_study, read_journal, sqlite_url, study_storage

SPACE = {"lr": FloatDistribution(1e-3, 1e-1, log=True), "head_width": CategoricalDistribution([16, 32])}
LAYOUTS = ["study.log", "study.db"]


@pytest.fixture(params=LAYOUTS)
def folder(request, tmp_path):
    """A sweep folder whose study is in `study.log` (Optuna's journal), or in `study.db` (SQLite: sweeps made before study.log)."""
    if request.param == "study.db":
        optuna.storages.RDBStorage(sqlite_url(tmp_path / "study.db"))  # an (empty) study database, as older sweeps have
    return tmp_path


def searcher(folder) -> StudySearch:
    return StudySearch(
        space=SPACE,
        metric="val_accuracy",
        mode="max",
        sampler=optuna.samplers.RandomSampler(seed=0),
        study_name="s",
        storage=study_storage(folder),
    )


def restored(folder, saved) -> StudySearch:
    """A searcher as Tuner.restore rebuilds it from the state saved at `saved`."""
    fresh = searcher(folder)
    fresh.restore(str(saved))
    return fresh


def flush(search: StudySearch) -> None:
    """What the journal does at the latest FLUSH_EVERY_S after a change (SQLite has written already)."""
    flush_study(search._storage)


def study_file(folder) -> str:
    return "study.db" if (folder / "study.db").exists() else "study.log"


def external(folder) -> optuna.Study:
    """The study as another process opens it from the file: Optuna's own storage classes (optuna-dashboard's)."""
    if study_file(folder) == "study.db":
        return optuna.load_study(study_name="s", storage=sqlite_url(folder / "study.db"))
    return optuna.load_study(
        study_name="s", storage=optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(folder / "study.log")))
    )


def study_trials(folder, search: StudySearch | None = None) -> list[optuna.trial.FrozenTrial]:
    """The trials in the study's file (after `search` wrote what it holds)."""
    if search is not None:
        flush(search)
    return external(folder).get_trials(deepcopy=False)


def result(value: float, step: int) -> dict:
    return {"val_accuracy": value, "training_iteration": step}


def test_reports_for_a_trial_the_study_already_finished_are_ignored(folder):
    """Study ahead: the driver told the study the trial's end after Tune's last save, then was killed; the
    restored Tune re-runs the trial's last epoch, which reports again and ends again."""
    search = searcher(folder)
    search.suggest("t1")
    search.on_trial_result("t1", result(0.5, 1))
    search.save(str(folder / "searcher.pkl"))  # Tune saves its state ...
    search.on_trial_complete("t1", result(0.7, 1))  # ... the driver tells the study and writes it, and is killed
    flush(search)
    again = restored(folder, folder / "searcher.pkl")
    again.on_trial_result("t1", result(0.6, 2))  # Ray's OptunaSearch raises UpdateFinishedTrialError here
    again.on_trial_complete("t1", result(0.9, 2))
    (trial,) = study_trials(folder, again)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.7  # the study keeps what it was told first
    assert trial.intermediate_values == {1: 0.5}


def test_a_trial_the_study_started_after_tunes_last_save_is_handed_out_again(folder):
    """Tune forgot a trial the study started: its settings go to the next trial Tune asks for, not a new draw."""
    search = searcher(folder)
    search.suggest("t1")
    search.save(str(folder / "searcher.pkl"))  # Tune saves its state here ...
    orphan = search.suggest("t2")  # ... and the driver dies after this ask (and its write)
    flush(search)
    again = restored(folder, folder / "searcher.pkl")
    assert [t.state for t in study_trials(folder, again)] == [TrialState.RUNNING, TrialState.WAITING]
    assert again.suggest("t3") == orphan
    again.on_trial_complete("t3", result(0.4, 1))
    again.on_trial_complete("t1", result(0.3, 1))
    trials = study_trials(folder, again)
    assert len(trials) == 2 and [t.value for t in trials] == [0.3, 0.4]


def _copy(folder, src: str, dest: str) -> None:
    name = study_file(folder)
    shutil.copy(folder / f"{src}{name}", folder / f"{dest}{name}")


def test_a_completion_the_study_lost_is_told_again_from_tunes_saved_state(folder):
    """Study behind: a copy of the study from before the trial finished, with Tune's state from after (results
    at a URI: the study is copied up after Tune's state)."""
    search = searcher(folder)
    search.suggest("t1")
    flush(search)
    _copy(folder, "", "older.")
    search.on_trial_complete("t1", result(0.8, 3))
    search.save(str(folder / "searcher.pkl"))
    _copy(folder, "older.", "")
    assert [t.state for t in study_trials(folder)] == [TrialState.RUNNING]
    again = restored(folder, folder / "searcher.pkl")
    (trial,) = study_trials(folder, again)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.8
    assert again.reconcile() == {"recreated": 0, "requeued": 0, "retold": 0}  # in step now: nothing more to do


def test_a_trial_the_study_never_recorded_is_recorded_with_the_settings_tune_runs(folder):
    """Study behind by a whole trial: a copy of the study from before Tune's running trial was asked for."""
    search = searcher(folder)
    search.suggest("t0")
    search.on_trial_complete("t0", result(0.2, 1))
    flush(search)
    _copy(folder, "", "older.")
    settings = search.suggest("t1")
    search.save(str(folder / "searcher.pkl"))
    _copy(folder, "older.", "")
    again = restored(folder, folder / "searcher.pkl")
    again.on_trial_result("t1", result(0.5, 1))
    again.on_trial_complete("t1", result(0.6, 2))
    trials = study_trials(folder, again)
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)
    assert trials[1].params == settings and trials[1].value == 0.6 and trials[1].intermediate_values == {1: 0.5}


@pytest.mark.parametrize("error", [False, True])
def test_a_searcher_in_step_with_the_study_changes_nothing_when_restored(folder, error):
    search = searcher(folder)
    search.suggest("t1")
    search.on_trial_complete("t1", None if error else result(0.5, 1), error=error)
    search.save(str(folder / "searcher.pkl"))
    again = restored(folder, folder / "searcher.pkl")
    assert again.reconcile() == {"recreated": 0, "requeued": 0, "retold": 0}
    (trial,) = study_trials(folder, again)
    assert trial.state == (TrialState.FAIL if error else TrialState.COMPLETE)


def test_the_journal_is_written_in_batches_at_tunes_saves_and_each_entry_once(tmp_path, monkeypatch):
    """A count, not a timing: asking, 3 trials x 10 results and their ends write nothing to study.log until Tune
    saves its state (the timer, a second after a change, is set an hour away here); the save appends every
    entry in one write, and the file then holds each entry once, whole, in order, and reads back as the same study."""
    monkeypatch.setattr(study, "FLUSH_EVERY_S", 3600.0)
    search = searcher(tmp_path)
    writes = []
    real_open = open

    def counting_open(file, mode="r", *args, **kwargs):
        if str(file).endswith("study.log") and "a" in mode:
            writes.append(mode)
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", counting_open)
    search.save(str(tmp_path / "searcher.pkl"))  # the study's creation
    assert writes == ["ab"]
    lines_before = len(list(read_journal(tmp_path / "study.log")))
    for k in range(3):
        search.suggest(f"t{k}")
        for step in range(1, 11):
            search.on_trial_result(f"t{k}", result(0.01 * step + k, step))
        search.on_trial_complete(f"t{k}", result(0.1 + k, 10))
    assert writes == ["ab"] and len(list(read_journal(tmp_path / "study.log"))) == lines_before
    search.save(str(tmp_path / "searcher.pkl"))
    assert writes == ["ab", "ab"]
    entries = list(read_journal(tmp_path / "study.log"))
    # Per trial: created, 2 settings, the asl-tune trial id, 10 intermediate values, its end.
    assert len(entries) - lines_before == 3 * (1 + 2 + 1 + 10 + 1)
    trials = study_trials(tmp_path)
    assert [t.value for t in trials] == [0.1, 1.1, 2.1] and all(len(t.intermediate_values) == 10 for t in trials)


def test_a_line_cut_short_by_a_kill_is_not_read_and_is_cut_off_before_the_next_write(tmp_path):
    search = searcher(tmp_path)
    search.suggest("t1")
    search.save(str(tmp_path / "searcher.pkl"))
    whole = (tmp_path / "study.log").read_bytes()
    with open(tmp_path / "study.log", "ab") as f:
        f.write(b'{"op_code":6,"worker_id":"x","trial_id":0,"sta')  # the kill, mid-write
    again = restored(tmp_path, tmp_path / "searcher.pkl")
    assert [t.state for t in study_trials(tmp_path)] == [TrialState.RUNNING]  # Optuna's reader skips it too
    again.on_trial_complete("t1", result(0.5, 1))
    (trial,) = study_trials(tmp_path, again)
    assert trial.state == TrialState.COMPLETE and trial.value == 0.5
    text = (tmp_path / "study.log").read_bytes()
    assert text.startswith(whole) and text.endswith(b"\n") and b'"sta{' not in text and text.count(b"\n") == whole.count(b"\n") + 1


def test_a_result_reads_nothing_from_the_study_and_a_trial_it_finished_first_is_known_without_a_read(tmp_path, monkeypatch):
    """A count, not a timing: a result costs the study no read, also after a restore from a Tune state older than
    the study (the study's finished trials are learned once, by reconcile). On study.db (older sweeps), where a
    read is several SQL queries."""
    optuna.storages.RDBStorage(sqlite_url(tmp_path / "study.db"))
    search = searcher(tmp_path)
    assert isinstance(search._storage, SweepStudyStorage)
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


def flush_threads(journal: SweepJournal) -> list[threading.Thread]:
    """The journal's timer threads still alive (at most one waits; a cancelled one ends at once)."""
    return [t for t in threading.enumerate() if t.name == f"flush {journal.path}" and t.is_alive()]


def no_flush_thread_left(journal: SweepJournal) -> bool:
    for thread in flush_threads(journal):
        thread.join(timeout=60)
    return not flush_threads(journal)


def test_an_entry_appended_while_a_flush_writes_reaches_the_file_with_the_next_flush(tmp_path, monkeypatch):
    """Forced: the append lands inside the flush's fsync (the file's lock held, the batch taken). It used to be
    counted written with that batch and never reach the file."""
    journal = SweepJournal(as_sweep_folder(tmp_path))
    journal.append_logs([{"op_code": 0, "i": 0}])
    real_fsync = os.fsync

    def fsync_with_an_append(fd):
        monkeypatch.setattr(os, "fsync", real_fsync)
        journal.append_logs([{"op_code": 0, "i": 1}])
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync_with_an_append)
    journal.flush()
    assert [e["i"] for e in read_journal(journal.path)] == [0]  # the append came after the batch was taken
    journal.flush()
    assert [e["i"] for e in read_journal(journal.path)] == [0, 1]
    journal.flush()
    assert [e["i"] for e in read_journal(journal.path)] == [0, 1]  # each once


def test_every_entry_reaches_the_file_once_while_tune_pickles_the_storage_from_another_thread(tmp_path):
    """One thread changes the study through its storage (as the searcher does); another pickles the storage
    meanwhile (as Tune's saves do, which flush the journal), and the timer flushes too. The file then holds each
    change exactly once, in order, and Optuna's own reader sees them all."""
    storage = study_storage(tmp_path)
    study_id = storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], "s")
    trial_id = storage.create_new_trial(study_id)
    n = 3000
    done = threading.Event()

    def change():
        try:
            for i in range(n):
                storage.set_trial_user_attr(trial_id, f"k{i}", i)
        finally:
            done.set()

    writer = threading.Thread(target=change)
    writer.start()
    saves = 0
    while not done.is_set() or saves < 3:
        pickle.dumps(storage)
        saves += 1
    writer.join()
    flush_study(storage)
    changes = [key for e in read_journal(tmp_path / "study.log") for key in e.get("user_attr", {})]
    assert changes == [f"k{i}" for i in range(n)]
    assert len(external(tmp_path).trials[0].user_attrs) == n


def test_a_change_reaches_the_file_with_nothing_else_happening_and_no_timer_is_left(tmp_path):
    """The timer keeps "at the latest FLUSH_EVERY_S after a change" alone: no save, no flush, no later change.
    (Polled up to a minute, so it passes at any machine speed; with no timer the file never appears.)"""
    journal = SweepJournal(as_sweep_folder(tmp_path))
    optuna.create_study(storage=optuna.storages.JournalStorage(journal), study_name="x")
    assert flush_threads(journal) and all(t.daemon for t in flush_threads(journal))  # it never keeps the process alive
    deadline = time.monotonic() + 60
    while not (journal.path.exists() and list(read_journal(journal.path))) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [e["study_name"] for e in read_journal(journal.path)] == ["x"]
    assert no_flush_thread_left(journal)  # it ends once nothing waits


def test_pickling_writes_the_journal_and_stops_its_timer_and_the_copy_starts_none(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "FLUSH_EVERY_S", 3600.0)
    storage = study_storage(tmp_path)
    optuna.create_study(storage=storage, study_name="s").enqueue_trial({"lr": 0.01})
    journal = storage._backend
    assert flush_threads(journal)
    copy = pickle.loads(pickle.dumps(storage))  # Tune's save, then `asl-tune resume` unpickling it
    assert no_flush_thread_left(journal)
    assert [t.state for t in external(tmp_path).trials] == [TrialState.WAITING]
    assert [t.system_attrs["fixed_params"] for t in copy.get_all_trials(0)] == [{"lr": 0.01}]  # the copy read the file
    assert no_flush_thread_left(copy._backend)


def test_what_the_journal_holds_is_written_when_the_process_exits(tmp_path):
    """Only the exit can write it here (the timer is set an hour away), and the timer does not keep the process
    alive: it exits at once (a hang fails the test through its timeout)."""
    script = textwrap.dedent(f"""
        import optuna
        from asl_tune.sweep import study
        from asl_tune.sweep.mirror import as_sweep_folder
        study.FLUSH_EVERY_S = 3600.0
        journal = study.SweepJournal(as_sweep_folder({str(tmp_path)!r}))
        optuna.create_study(storage=optuna.storages.JournalStorage(journal), study_name="s").enqueue_trial({{"lr": 0.02}})
        assert not journal.path.exists()
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    (trial,) = external(tmp_path).trials
    assert trial.state == TrialState.WAITING and trial.system_attrs["fixed_params"] == {"lr": 0.02}
