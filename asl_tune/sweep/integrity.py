"""Is a sweep's folder whole? Checked before `resume`, `--extend` and `analyze` touch it.

A damaged piece that the command needs is refused in one line that names the file and what to do, before
anything is written, so the folder keeps the same bytes. A damaged piece that the command does not need
(analyze reads only the Parquet tables; a finished trial's checkpoint matters only to whoever loads its
weights) is named in a note, and the command goes on.

Checked: `sweep.json` and `space.yaml` (read by request.py, which refuses them in one line already), the
study (Optuna's journal, whose every whole line must replay; or, in a sweep made before it, an SQLite file
whose tables Optuna wrote), each Parquet table, Tune's folder of the run being resumed,
and the checkpoints that trials.parquet names.
"""

from __future__ import annotations

import sqlite3
import sys
from contextlib import closing
from pathlib import Path

from asl_tune.errors import AslTuneError
from asl_tune.results import RESULT_FILES, TRIALS, read_table, table_frame
from asl_tune.sweep.request import LEGACY_STUDY_FILE, RAY_DIR, SPACE_FILE, SWEEP_FILE, SweepState, study_file
from asl_tune.sweep.space import load_space

BACKUP = "put it back from a backup or a copy of the sweep"
CONTINUED = ("running", "errored")  # the trials a resume continues from their last checkpoint


def check_study(study: Path, shown: str) -> str | None:
    """Why the study file cannot be used (None: it can, or there is none yet). Read-only: the file is not touched."""
    if not study.exists():
        return None
    if study.name == LEGACY_STUDY_FILE:
        return _check_sqlite_study(study, shown)
    import optuna

    from asl_tune.sweep.study import ReadOnlyJournal

    try:
        storage = optuna.storages.JournalStorage(ReadOnlyJournal(study))
        storage.get_all_studies()  # replays every whole line: an entry Optuna cannot apply raises
    except Exception as e:  # noqa: BLE001 - whatever Optuna raises replaying a damaged journal
        return f"{shown}: not a readable Optuna journal ({_first_line(e)})"
    return None


def _check_sqlite_study(study: Path, shown: str) -> str | None:
    try:
        with closing(sqlite3.connect(f"file:{study}?mode=ro", uri=True)) as db:  # closed however the reads end
            (ok,) = db.execute("PRAGMA quick_check").fetchone()
            db.execute("SELECT count(*) FROM studies").fetchone()
    except sqlite3.Error as e:
        return f"{shown}: not a readable Optuna study ({e})"
    return None if ok == "ok" else f"{shown}: the study's database is damaged ({ok})"


def check_tables(folder: Path, shown: str) -> dict:
    """Refuse a Parquet table that cannot be read whole; every command that reads results needs all four.
    Returns them as read ({name: pyarrow Table, or None where there is none yet}; results.table_frame makes DataFrames)."""
    tables = {}
    for name in RESULT_FILES:
        try:
            tables[name] = read_table(folder, name)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise AslTuneError(f"{shown}/{name}: damaged, cannot be read ({_first_line(e)}); {BACKUP}; nothing was changed") from None
    return tables


def missing_checkpoints(folder: Path, trials) -> dict[str, tuple[str, str]]:
    """trial_id -> (status, where its checkpoint should be) of each trial whose checkpoint, named in trials (the
    folder's trials.parquet, read once by the caller), is not on disk."""
    if "checkpoint" not in trials:
        return {}
    named = trials[trials["checkpoint"].notna() & (trials["checkpoint"].astype(str) != "")]
    where = {r.trial_id: (r.status, _at(folder, r.checkpoint)) for r in named.itertuples() if "://" not in str(r.checkpoint)}
    return {tid: (status, str(path)) for tid, (status, path) in where.items() if not path.exists()}


def _at(folder: Path, checkpoint: str) -> Path:
    """Where a recorded checkpoint is now: under this sweep folder's ray/ when the path runs through one (the
    folder may have been moved or copied since the path was written), else the path as recorded."""
    text = str(checkpoint).replace("\\", "/")
    marker = f"/{RAY_DIR}/run-"
    if marker in text:
        return folder / text[text.rindex(marker) + 1 :]
    path = Path(checkpoint)
    return path if path.is_absolute() else folder / path


def check_for_resume(folder: Path, shown: str, run_dir: str | None, earlier_trials: int) -> None:
    """Everything `resume` needs: the study, the tables, Tune's folder of the run (run_dir, relative to the
    sweep folder; None when Ray's storage is elsewhere), the checkpoints of the trials it continues."""
    why = _check_study_of(folder, shown)
    if why:
        raise AslTuneError(f"{why}; {BACKUP}; resume needs it to go on asking for settings; nothing was changed")
    trials = table_frame(TRIALS, check_tables(folder, shown)[TRIALS])
    if run_dir is not None and not (folder / run_dir).exists() and len(trials) > earlier_trials:
        raise AslTuneError(
            f"{shown}/{run_dir}: missing, and trials.parquet has trials of that run: Tune's saved state is gone; {BACKUP}; nothing was changed"
        )
    missing = missing_checkpoints(folder, trials)
    for tid, (status, checkpoint) in missing.items():
        if status in CONTINUED:
            raise AslTuneError(f"{checkpoint}: missing, and trial {tid} ({status}) continues from it; {BACKUP}; nothing was changed")
    _note_missing_weights(missing)


def check_for_extend(folder: Path, shown: str) -> None:
    """Everything `--extend` needs: the study (it goes on learning from it) and the tables."""
    why = _check_study_of(folder, shown)
    if why:
        raise AslTuneError(f"{why}; {BACKUP}; --extend learns from it; nothing was changed")
    tables = check_tables(folder, shown)
    _note_missing_weights(missing_checkpoints(folder, table_frame(TRIALS, tables[TRIALS])))


def check_for_analysis(folder: Path, shown: str) -> dict:
    """analyze needs the tables only; a damaged study or missing weights are named and the analysis goes on.
    Returns the tables as check_tables read them, so the caller reads none twice."""
    tables = check_tables(folder, shown)
    why = _check_study_of(folder, shown)
    record = _unreadable(lambda: SweepState.read(folder, f"{shown}/{SWEEP_FILE}")) if (folder / SWEEP_FILE).exists() else None
    space = _unreadable(lambda: load_space(folder / SPACE_FILE)) if (folder / SPACE_FILE).exists() else None
    for damaged in filter(None, [why, record, space]):
        _note(f"{damaged}; analyze does not need it and goes on; resume and --extend refuse until it is put back")
    _note_missing_weights(missing_checkpoints(folder, table_frame(TRIALS, tables[TRIALS])))
    return tables


def _check_study_of(folder: Path, shown: str) -> str | None:
    name = study_file(folder)
    return check_study(folder / name, f"{shown}/{name}")


def _unreadable(read) -> str | None:
    """The one-line refusal that reading a sweep's record or space gives (None: it reads)."""
    try:
        read()
    except AslTuneError as e:
        return str(e)
    return None


def _note_missing_weights(missing: dict[str, tuple[str, str]]) -> None:
    for tid, (status, checkpoint) in missing.items():
        if status not in CONTINUED:
            _note(f"{checkpoint}: missing; trial {tid} ({status}) keeps its results, but its weights cannot be loaded")


def _note(text: str) -> None:
    print(f"asl-tune: note: {text}", file=sys.stderr, flush=True)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
