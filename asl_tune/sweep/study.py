"""The sweep's Optuna study: where it is stored (study.log, Optuna's journal), and the searcher that keeps it in step with Tune.

The study is Optuna's JournalStorage: the study in memory, every change to it one JSON line of an
append-only file, `study.log`, which optuna-dashboard opens as it is (`optuna-dashboard study.log`).
`SweepJournal` appends those lines in batches, not one by one: when Tune saves its experiment state (it
pickles the searcher, and the journal writes what it holds first), at the latest FLUSH_EVERY_S after a
change (a timer thread, so a reader such as optuna-dashboard sees every change within about a second even
when nothing else happens), and at the process's exit. So asking for a trial, a reported epoch and a trial's
end cost no database write (in SQLite, through Optuna's RDBStorage, they were over half of the driver's time
in a sweep of 300 trials; issue 15), and the file is never behind the state a resume starts from: a SIGKILL
loses only what came after Tune's last save. Only whole lines are ever read back: a line cut short by a kill
is left out, and cut off before the next write.

Sweeps made before study.log have `study.db` (SQLite, RDBStorage); they go on with it (`study_storage`).

Tune pickles the searcher, with its storage, into the run's experiment state, and `asl-tune resume`
unpickles it. The storage keeps the sweep's folder (mirror.SweepFolder), not an absolute path: for a sweep
whose `--results` is a URI the path is a staging folder on the first driver's machine, and the study is
found again in this process's copy of the folder where it is unpickled; the journal is then read from the
file itself, not from what was pickled.

So a driver killed between a write of the study and Tune's next save leaves the two out of step (the study
ahead; behind, for a sweep at a URI, where study.log is copied after Tune's state); `StudySearch` reconciles
them when Tune restores it.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
import weakref
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import BaseJournalBackend, JournalFileSymlinkLock
from optuna.trial import Trial, TrialState, create_trial
from ray.tune.search.optuna import OptunaSearch

from asl_tune.sweep.mirror import SweepFolder, as_sweep_folder
from asl_tune.sweep.request import LEGACY_STUDY_FILE, STUDY_FILE, study_file

log = logging.getLogger(__name__)


TRIAL_ID_ATTR = "asl_tune_trial_id"  # user attribute of each study trial: the trial_id of its Parquet rows
FLUSH_EVERY_S = 1.0  # the longest a change to the study waits in memory (Tune saves its state about once a second)


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{Path(path).resolve()}"


class SweepStudyStorage(RDBStorage):
    """An RDBStorage on `<sweep folder>/study.db`, the folder worked out again where it is unpickled (sweeps made before study.log)."""

    def __init__(self, sweep: SweepFolder, study_file: str):
        self._sweep = sweep
        self._study_file = study_file
        super().__init__(sqlite_url(sweep.path / study_file))

    def __setstate__(self, state: dict) -> None:
        state["url"] = sqlite_url(state["_sweep"].path / state["_study_file"])
        super().__setstate__(state)


def read_journal(path: Path) -> Iterator[dict[str, Any]]:
    """The whole lines of a journal file, decoded, in order; a last line cut short (a kill mid-write) is left out.

    A line that is not a JSON object raises ValueError naming its number (the file is damaged)."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.endswith(b"\n"):
                return  # the last line, not finished
            try:
                entry = json.loads(line)
            except ValueError:
                raise ValueError(f"line {number} is not JSON") from None
            if not isinstance(entry, dict) or "op_code" not in entry:
                raise ValueError(f"line {number} is not an entry of Optuna's journal")
            yield entry


class ReadOnlyJournal(BaseJournalBackend):
    """A journal file read, never written (Optuna's own backend creates a missing file, and locks it to write):
    for checking a study before a command touches the folder."""

    def __init__(self, path: Path):
        self.path = path

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        return islice(read_journal(self.path), log_number_from, None)

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        raise PermissionError(f"{self.path}: opened read-only")


class SweepJournal(BaseJournalBackend):
    """Optuna's journal of the study in `<sweep folder>/study.log`, its new entries appended in batches.

    One driver writes (it holds the sweep's lock); any number of readers (optuna-dashboard, analyze) see whole
    lines only. Appends take Optuna's lock on the file, so a note optuna-dashboard adds lands whole, between
    two batches (this driver's copy of the study does not see it; the next driver to open the file does).
    Entries the storage writes are handed back to it at once (it reads back what it wrote to update its copy
    of the study), and reach the file at `flush`: when this is pickled (Tune saving its state), FLUSH_EVERY_S
    after the first change not yet written (a daemon timer thread, alive only while a change waits), and at
    the process's exit.

    Several threads flush (the storage's, the timer, Tune saving its state, exit), so the entries a flush
    writes are the ones it took under `_lock`, and only those are counted written: an entry appended while a
    flush writes waits for the next one. `_lock` is never held while the file is written, so an append never
    waits for a disk; `_writing` makes the flushes take turns.
    """

    def __init__(self, sweep: SweepFolder, study_file: str = STUDY_FILE):
        self._sweep = sweep
        self._study_file = study_file
        self._lock = threading.Lock()  # guards the fields below
        self._writing = threading.Lock()  # held by the one flush writing to the file
        self._unread = True  # the file is read (whole) at the storage's first read
        self._base = 0  # the log number of self._recent[0]
        self._recent: list[dict[str, Any]] = []  # entries written since, not yet both in the file and handed back
        self._written = 0  # how many of self._recent are in the file
        self._timer: threading.Timer | None = None  # the flush due FLUSH_EVERY_S after the oldest entry not in the file
        self._checked_end = False  # whether a last line cut short was looked for (before the first append)
        _JOURNALS.add(self)  # written at the process's exit

    @property
    def path(self) -> Path:
        return self._sweep.path / self._study_file

    def __getstate__(self) -> dict:
        self.flush()  # Tune saves its state: the study in the file first
        return {"_sweep": self._sweep, "_study_file": self._study_file}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["_sweep"], state["_study_file"])  # read again from the file (JournalStorage replays it)

    def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        with self._lock:
            if not self._unread and log_number_from >= self._base:
                recent = self._recent[log_number_from - self._base :]
                # All handed back now: forget those also in the file (memory stays one flush's worth).
                del self._recent[: self._written]
                self._base += self._written
                self._written = 0
                return iter(recent)
        return self._read_file(log_number_from)

    def _read_file(self, log_number_from: int) -> Iterator[dict[str, Any]]:
        """The storage's first read (a new storage, or one just unpickled): the whole file, read as it streams."""
        self.flush()
        count = 0
        if self.path.exists():
            for count, entry in enumerate(read_journal(self.path), start=1):
                if count > log_number_from:
                    yield entry
        with self._lock:
            self._unread, self._base, self._recent, self._written = False, count, [], 0

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self._lock:
            self._recent.extend(logs)
            self._arm()

    def flush(self) -> None:
        """Append the entries not yet in the file, in one write and one fsync."""
        with self._writing:
            with self._lock:
                pending = self._recent[self._written :]
                self._disarm()  # what comes from now on arms the timer again
            if not pending:
                return
            text = "".join(json.dumps(entry, separators=(",", ":")) + "\n" for entry in pending).encode()
            self._append(text)
            with self._lock:
                # The entries taken above, not len(self._recent): one appended meanwhile is not in the file yet.
                # (read_logs may have dropped written entries meanwhile; it lowered _written by as many.)
                self._written += len(pending)

    def _append(self, text: bytes) -> None:
        # Optuna's own lock (a symlink beside the file), so an append by optuna-dashboard (a note) never interleaves.
        lock = JournalFileSymlinkLock(str(self.path))
        lock.acquire()
        try:
            with open(self.path, "ab") as f:
                if not self._checked_end:
                    _cut_unfinished_line(f)
                    self._checked_end = True
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        finally:
            lock.release()

    def _arm(self) -> None:
        """Start the timer that flushes FLUSH_EVERY_S from now, unless one runs (called with _lock held)."""
        if self._timer is None:
            self._timer = threading.Timer(FLUSH_EVERY_S, self._flush_due)
            self._timer.name = f"flush {self.path}"
            self._timer.daemon = True  # never keeps the process alive: exit writes what waits (flush_journals)
            self._timer.start()

    def _disarm(self) -> None:
        """Stop the timer, if one runs (called with _lock held)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _flush_due(self) -> None:
        try:
            self.flush()
        except Exception as e:  # a full disk: the entries stay in memory, tried again (and Tune's next save raises)
            if not self.path.parent.is_dir():
                return  # the sweep's folder was removed: nowhere to write them
            log.warning("%s: could not write the study's journal (%s); trying again in %g s", self.path, e, FLUSH_EVERY_S)
            with self._lock:
                self._arm()


_JOURNALS: weakref.WeakSet[SweepJournal] = weakref.WeakSet()  # every journal of this process, for flush_journals


@atexit.register
def flush_journals() -> None:
    """Write what each journal still holds: when the process exits (its timer is a daemon thread, stopped with it),
    and before a driver that lost its Ray head ends itself (run._fit)."""
    for journal in list(_JOURNALS):
        if not journal.path.parent.is_dir():
            continue  # the sweep's folder was removed (a test's temporary folder): nowhere to write
        try:
            journal.flush()
        except Exception as e:
            log.warning("%s: could not write the study's journal at exit (%s)", journal.path, e)


def _cut_unfinished_line(f) -> None:
    """Truncate a journal file opened for appending after its last whole line (a line a kill cut short is never read)."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    with open(f.name, "rb") as r:
        step, end = 1 << 16, size
        while end > 0:
            start = max(0, end - step)
            r.seek(start)
            chunk = r.read(end - start)
            if end == size and chunk.endswith(b"\n"):
                return
            cut = chunk.rfind(b"\n")
            if cut >= 0:
                f.truncate(start + cut + 1)
                return
            end = start
    f.truncate(0)


def study_storage(sweep: SweepFolder | Path) -> BaseStorage:
    """The storage of a sweep's study, in its folder (for results at a URI, in this machine's working copy):
    Optuna's journal in study.log, or study.db (SQLite) for a sweep made before study.log."""
    folder = as_sweep_folder(sweep)
    name = study_file(folder.path)
    if name == LEGACY_STUDY_FILE:
        return SweepStudyStorage(folder, name)
    return JournalStorage(SweepJournal(folder, name))


def flush_study(storage: BaseStorage | None) -> None:
    """Write what the study's journal holds in memory (nothing to do for SQLite, which writes at once)."""
    backend = getattr(storage, "_backend", None)
    if isinstance(backend, SweepJournal):
        backend.flush()


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

    def _told_trials(self) -> dict[str, tuple]:
        """Tune trial id -> (state name, values, the study's trial id) of each trial this searcher told the study.

        Saved with Tune's state (OptunaSearch pickles __dict__); absent in a searcher pickled before it existed,
        and without the study's trial id in one pickled before told trials left self._ot_trials."""
        return self.__dict__.setdefault("_told", {})

    def _study_trial_id(self, trial_id: str) -> int | None:
        """The study's own id of a Tune trial this searcher knows: running (self._ot_trials), or told."""
        if trial_id in self._ot_trials:
            return self._ot_trials[trial_id]._trial_id
        told = self._told_trials().get(trial_id)
        return told[2] if told is not None and len(told) > 2 else None

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
            self._told_trials()[trial_id] = (frozen.state.name, frozen.values, frozen._trial_id)
            self._finished_ids().add(trial_id)
            # Nothing asks for a told trial's Trial again: kept, the searcher Tune pickles at every save of its state
            # would grow by one trial's record a trial (issue 15: 0.6 s a save at 10,000 trials).
            del self._ot_trials[trial_id]
        self._completed_trials.add(trial_id)

    def restore(self, checkpoint_path: str) -> None:
        super().restore(checkpoint_path)
        self.reconcile()

    def reconcile(self) -> dict[str, int]:
        """Bring the study in step with the Tune state this searcher was restored with; return what was done.

        The study is read once, whole (a trial at a time would be as many reads as the sweep has trials).
        """
        storage, study_id = self._ot_study._storage, self._ot_study._study_id
        # Read from the study's file itself (self._storage, the storage the searcher was given; the journal reads its
        # file again once unpickled), not through the study's cache of an RDBStorage: that was pickled with Tune's
        # state and may hold trials the study.db beside it never recorded.
        in_study = {frozen._trial_id: frozen for frozen in (self._storage or storage).get_all_trials(study_id, deepcopy=False)}
        done = {"recreated": 0, "requeued": 0, "retold": 0}
        for trial_id, ot_trial in list(self._ot_trials.items()):
            if ot_trial._trial_id not in in_study and trial_id not in self._completed_trials:
                # The study was copied before it recorded this trial: record it again, with the settings Tune runs.
                template = create_trial(
                    state=TrialState.RUNNING,
                    params=ot_trial._cached_frozen_trial.params,
                    distributions=ot_trial._cached_frozen_trial.distributions,
                )
                self._ot_trials[trial_id] = Trial(self._ot_study, storage.create_new_trial(study_id, template_trial=template))
                done["recreated"] += 1
        known = {self._study_trial_id(tid) for tid in (*self._ot_trials, *self._told_trials())}
        for frozen in in_study.values():
            if frozen.state == TrialState.RUNNING and frozen._trial_id not in known:  # asked after Tune's last save: Tune will ask again
                storage.set_trial_state_values(frozen._trial_id, TrialState.WAITING)
                done["requeued"] += 1
        for trial_id, (state, values, *_) in self._told_trials().items():
            frozen = in_study.get(self._study_trial_id(trial_id))
            if frozen is not None and not frozen.state.is_finished():
                storage.set_trial_state_values(frozen._trial_id, TrialState[state], values)
                done["retold"] += 1
        # What the study finished: a trial Tune's older state still runs reports again, and is ignored (see above).
        finished = {tid for tid, t in self._ot_trials.items() if t._trial_id in in_study and in_study[t._trial_id].state.is_finished()}
        self.__dict__["_finished"] = finished | {tid for tid in self._told_trials() if self._study_trial_id(tid) is not None}
        if any(done.values()):
            log.warning(
                "study.db was out of step with Tune's saved state: %(recreated)d trial(s) recorded again, %(requeued)d put back in the queue, %(retold)d completion(s) told again",
                done,
            )
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
