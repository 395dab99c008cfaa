"""The only module that writes or reads Parquet: one row per trial, per epoch, per confusion cell, per class.

Each of the four tables is a folder of Parquet files, a dataset that `pandas.read_parquet(folder)` reads
in one call (see results/README.md):

    trials.parquet/schema.parquet          no rows: every column the parts hold, with its type; it sorts
                                           first, so a one-call reader takes the columns from it
    trials.parquet/sealed-<generation>.parquet  the rows of trials that ended for good, many to a part: all of them
                                           after a compaction (compact), or those a flush found ended (below)
    trials.parquet/trial-<trial_id>.parquet  the rows of one trial, rewritten whole when they change

A result rewrites only its own trial's parts, so what it costs does not grow with the sweep. Every write
goes to a temporary file beside the target and is renamed over it (files.write_atomically), so a reader
(or a crash) only ever sees a whole part, old or new, never a torn one, and a trial's rows are in one
part only, never two. Sweeps written before parts (one file per table, rewritten whole) are read as they
are, and moved to parts by the first write.

A trial that ended for good before it had a part of its own in a table (short trials: they start and end
between two flushes) never gets one: a flush writes the rows of all such trials in one new sealed part per
table (ResultsStore.end_trial), a part a flush instead of a part a trial (issue 29: the part writes at trial
ends were a tenth of the driver's time at 1,000 short trials). Its trials are in no other part, so the one
new file adds them to the table at once, for pandas' one-call reader too.

A part per trial costs a reader a file (its footer above all: 10,000 trials took 36 s to read), so a sweep's
driver compacts the folders when a run starts and when it ends (compact): a table's rows are regrouped in
a new folder beside it (the ended trials' rows in one sealed part, the other parts linked as they are),
which is swapped with the table's folder in one rename (Linux's renameat2 RENAME_EXCHANGE), then the old
one is removed. A reader that lists the folder lists the old parts or the new ones, never some of each, so
it never meets a row twice nor misses one; one that listed the old parts and opens one after the swap
finds it gone and fails (FileNotFoundError), and `read_table` then reads the folder again. A sealed part
that a flush added meanwhile holds only trials the listing had no part of: the reading stands, as of its
listing. Where the swap is not available, the parts are left as they are.
"""

from __future__ import annotations

import ctypes
import errno
import io
import os
import shutil
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically

if TYPE_CHECKING:
    import numpy as np

TRIALS = "trials.parquet"
EPOCHS = "epochs.parquet"
CONFUSION = "confusion.parquet"
PER_CLASS = "per_class.parquet"
RESULT_FILES = (TRIALS, EPOCHS, CONFUSION, PER_CLASS)
SCHEMA_PART = "schema.parquet"  # in each table's folder, before the trial-<id>.parquet parts in name order
SEALED_PREFIX = "sealed-"  # sealed-<generation>.parquet: ended trials' rows, many to a part; sorts after schema.parquet
TRIAL_PREFIX = "trial-"
READ_TRIES = 20  # readings of a table that a compaction may cut short, each then read again (compactions are seconds apart at least)

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
    "peak_private_mb",  # the trial's anonymous memory at its highest report (no dataset pages): what one more trial on a node costs
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
EPOCH_COLUMNS = [
    "trial_id",
    "epoch",
    "train_loss",
    "train_accuracy",
    "val_loss",
    "val_accuracy",
    "train_img_per_s",
    "images_seen",
    "seconds",
]
CONFUSION_COLUMNS = ["trial_id", "true_label", "pred_label", "count"]
PER_CLASS_COLUMNS = ["trial_id", "class_name", "support", "precision", "recall", "fpr", "fnr"]
COLUMNS = {TRIALS: TRIAL_COLUMNS, EPOCHS: EPOCH_COLUMNS, CONFUSION: CONFUSION_COLUMNS, PER_CLASS: PER_CLASS_COLUMNS}
METRICS = [
    c
    for c in TRIAL_COLUMNS
    if c
    not in (
        "trial_id",
        "status",
        "node_id",
        "hostname",
        "device",
        "precision",
        "started_at",
        "ended_at",
        "checkpoint",
        "error",
        "log",
        "keeps_up_30fps",
    )
]


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


def write_atomic(df: pd.DataFrame | pa.Table, path: Path) -> None:
    """Write df (a DataFrame or an Arrow table) to path as Parquet through a temporary file and a rename; on failure the old file stays whole."""
    path = Path(path)

    def refused(e: OSError) -> AslTuneError:
        why = "the disk is full" if e.errno == errno.ENOSPC else (e.strerror or str(e))
        return AslTuneError(f"results: cannot write {path}: {why}; the previous file is left intact")

    def write(tmp) -> None:
        if isinstance(df, pa.Table):
            pq.write_table(df, tmp)
        else:
            df.to_parquet(tmp, index=False)

    write_atomically(path, write, error=refused)


def read_snapshot(path: Path) -> pd.DataFrame:
    """One Parquet file as it was at one instant, even while a writer replaces it.

    Parquet readers open a file more than once (footer, then pages); were it replaced in between,
    they would mix two versions. One open() pins one version, so read it whole, then parse.
    """
    with open(path, "rb") as f:
        return pd.read_parquet(io.BytesIO(f.read()))


def part_name(trial_id: str) -> str:
    """The file in each table's folder that holds one trial's rows."""
    return f"{TRIAL_PREFIX}{trial_id}.parquet"


def sealed_name(generation: int) -> str:
    """The file in a table's folder that holds the ended trials' rows after its generation-th compaction."""
    return f"{SEALED_PREFIX}{generation:06d}.parquet"


def _generation(name: str) -> int:
    return int(name[len(SEALED_PREFIX) : -len(".parquet")])


def _parquet_names(path: Path) -> list[str]:
    return sorted(n for n in os.listdir(path) if n.endswith(".parquet") and not n.startswith("."))


def _read_part(path: Path) -> pa.Table:
    with open(path, "rb") as f:
        return pq.ParquetFile(pa.BufferReader(f.read())).read()  # half read_table's cost a part (its dataset layer)


def read_table(folder: Path, name: str) -> pa.Table | None:
    """One table of a sweep folder as it stands (None when it has none yet): a folder of parts, or a sweep's one file from before parts.

    Each part is read whole from one open() (see read_snapshot), so a part replaced meanwhile is read old
    or new, never torn; one removed since the listing (a trial dropped at a resume) is left out. A reading
    that a compaction swapped the folder under (its identity or its sealed parts changed) is read again.
    A trial's rows are taken from one part only: its own part, else the newest sealed part that holds it
    (two hold it only at a URI while a compaction's copy is under way, see mirror.py). A sealed part added
    since the listing (a flush's, see ResultsStore.end_trial) holds trials the listing had no part of: the
    reading stands, as the table was when listed.
    """
    path = Path(folder) / name
    for _ in range(READ_TRIES):
        try:
            before = os.stat(path)
            if not stat.S_ISDIR(before.st_mode):
                return _read_part(path)  # the layout before parts: the table is this one file
            names = _parquet_names(path)
        except FileNotFoundError:
            return None
        tables: dict[str, pa.Table] = {}
        for part in names:
            try:
                tables[part] = _read_part(path / part)
            except FileNotFoundError:
                continue
        try:
            after = os.stat(path)
            same = (after.st_ino, after.st_dev) == (before.st_ino, before.st_dev) and set(_sealed(names)) <= set(
                _sealed(_parquet_names(path))
            )
        except FileNotFoundError:
            same = False
        if same:
            return _one_part_a_trial(tables)
    raise AslTuneError(f"results: {path} was compacted {READ_TRIES} times while being read; read it again")


def _sealed(names: Iterable[str]) -> list[str]:
    return [n for n in names if n.startswith(SEALED_PREFIX)]


def _one_part_a_trial(tables: dict[str, pa.Table]) -> pa.Table | None:
    """The parts' rows, each trial's from one part: its own, else the newest sealed part holding it.

    A trial is held twice only in passing (at a URI while a compaction's copy is under way; a sealed trial that
    reported again where the folder swap is not available): those few are found first, so a folder of many
    sealed parts (a run's flushes) costs one pass over their trial ids, not one a part."""
    own = {n[len(TRIAL_PREFIX) : -len(".parquet")] for n in tables if n.startswith(TRIAL_PREFIX)}
    sealed = sorted(_sealed(tables), key=_generation, reverse=True)
    held = [pa.array(sorted(own), pa.large_string())]
    held += [pc.unique(tables[part]["trial_id"]).cast(pa.large_string()) for part in sealed if tables[part].num_rows]
    counts = pc.value_counts(pa.chunked_array(held, pa.large_string()))
    twice = set(counts.field("values").filter(pc.greater(counts.field("counts"), 1)).to_pylist())
    seen = own & twice
    for part in sealed if twice else ():
        table = tables[part]
        if seen and table.num_rows:
            tables[part] = table.filter(pc.invert(pc.is_in(table["trial_id"], pa.array(sorted(seen), table["trial_id"].type))))
        seen.update(twice.intersection(pc.unique(table["trial_id"]).to_pylist()))  # an older sealed part's copies of these are left out
    parts = list(tables.values())
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _exchange(a: Path, b: Path) -> None:
    """Swap two folders on one filesystem in one step (renameat2 RENAME_EXCHANGE); OSError where it cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    at_cwd, rename_exchange = -100, 2
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), rename_exchange) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def regroup(folder: Path, name: str, sealed_ids: Iterable[str], table: pa.Table | None = None) -> list[str]:
    """Rebuild one table's folder with the rows of `sealed_ids` in one new sealed part and every other trial's in
    its own part, the rows themselves unchanged, and swap it in at once; return the files written, then those
    removed, relative to the folder (for mirror.SweepFolder.sync: a copy at a URI gets the new ones first).

    The caller holds the sweep (request.exclusive): nothing else writes the table meanwhile. table: the table as
    read_table just read it, if the caller has it.
    """
    folder, sealed_ids = Path(folder), set(sealed_ids)
    path, staging = folder / name, folder / f".{name}.regroup"
    table = read_table(folder, name) if table is None else table
    if table is None or not path.is_dir():
        return []
    names = _parquet_names(path)
    generation = max((_generation(n) for n in _sealed(names)), default=0) + 1
    shutil.rmtree(staging, ignore_errors=True)  # what a driver killed during a compaction left
    staging.mkdir()
    try:
        if SCHEMA_PART in names:
            os.link(path / SCHEMA_PART, staging / SCHEMA_PART)
        else:
            pq.write_table(table.schema.empty_table(), staging / SCHEMA_PART)
        ids = table["trial_id"]
        sealed = table.filter(pc.is_in(ids, pa.array(sorted(sealed_ids), ids.type)))
        order = [("trial_id", "ascending")] + ([("epoch", "ascending")] if "epoch" in sealed.column_names else [])
        # Trial order: readers need not sort. Strings as large_string, pandas' own layout for them: read into a DataFrame as they are.
        wide = pa.schema([f.with_type(pa.large_string()) if f.type == pa.string() else f for f in sealed.schema])
        pq.write_table(sealed.sort_by(order).cast(wide), staging / sealed_name(generation))
        written = [sealed_name(generation)]
        for trial_id in sorted(set(pc.unique(ids).to_pylist()) - sealed_ids):
            part = part_name(trial_id)
            if part in names:
                os.link(path / part, staging / part)  # unchanged: the same file under the new folder
            else:  # out of a sealed part again (it reports again): its own part, from the rows it had there
                pq.write_table(table.filter(pc.equal(ids, trial_id)), staging / part)
                written.append(part)
        removed = [n for n in names if not (staging / n).exists()]
        _exchange(staging, path)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        return []  # no swap here (or a failed write): the parts stay as they were, read as before
    shutil.rmtree(staging, ignore_errors=True)  # the old folder: a reader that still lists it reads the table again
    return [f"{name}/{n}" for n in written + removed]


def sealed_parts(folder: Path, name: str) -> dict[str, str]:
    """The trials whose rows of one table are in a sealed part, each with the newest such part (its file name)."""
    path = Path(folder) / name
    try:
        names = sorted(_sealed(_parquet_names(path)), key=_generation)
    except (FileNotFoundError, NotADirectoryError):
        return {}
    return {tid: n for n in names for tid in pc.unique(pq.read_table(path / n, columns=["trial_id"])["trial_id"]).to_pylist()}


def compact(folder: Path) -> list[str]:
    """Move the rows of every trial that ended for good (completed, stopped early, diverged) into one sealed part
    per table, when some are still in parts of their own or in more than one sealed part (a sweep's flushes add
    one at a time, see ResultsStore.end_trial); return the files written and removed (see regroup).

    Errored trials keep their parts: a resume runs them again. For the driver that holds the sweep, before
    and after Tune runs (sweep/run.py: a sweep in a folder, not one at a URI), when no ResultsStore is open on the folder.
    """
    trials = read_table(folder, TRIALS)
    if trials is None or "status" not in trials.column_names:
        return []
    ended = set(trials.filter(pc.is_in(trials["status"], pa.array([*FINISHED, "diverged"])))["trial_id"].to_pylist())
    changed = []
    for name in RESULT_FILES:
        path = Path(folder) / name
        if not path.is_dir():
            continue
        names = _parquet_names(path)
        loose = {n[len(TRIAL_PREFIX) : -len(".parquet")] for n in names if n.startswith(TRIAL_PREFIX)} & ended
        if loose or len(_sealed(names)) > 1:
            changed += regroup(folder, name, ended, trials if name == TRIALS else None)  # read once: not the sealed parts' ids first
    return changed


def _read(folder: Path, name: str, columns: list[str]) -> pd.DataFrame:
    """A table as a DataFrame, its rows in trial order (epochs by epoch within a trial); an empty frame when none yet."""
    return table_frame(name, read_table(folder, name))


def table_frame(name: str, table: pa.Table | None) -> pd.DataFrame:
    """What read_trials (read_epochs, ...) gives for table `name` (one of RESULT_FILES) as read_table read it: a reader
    that has the tables already (integrity.check_tables read them whole) need not read the files again."""
    if table is None:
        return pd.DataFrame(columns=COLUMNS[name])
    if name == TRIALS:
        return _ordered(table.to_pandas(), TRIAL_COLUMNS)
    return _in_trial_order(table, ["trial_id", "epoch"] if name == EPOCHS else ["trial_id"]).to_pandas()


def _in_trial_order(table: pa.Table, keys: list[str]) -> pa.Table:
    """The rows sorted by keys (a stable sort), in Arrow: a sealed part is in that order already, which is checked, not sorted
    again (pandas' sort of 10,000 trials' 8 M confusion rows, as Python strings, was most of reading them)."""
    if table.num_rows < 2:
        return table
    ahead, behind = table.slice(0, table.num_rows - 1), table.slice(1)
    in_order = pc.less_equal(ahead[keys[-1]], behind[keys[-1]])
    for key in reversed(keys[:-1]):  # lexicographic: an earlier key decides where it differs
        in_order = pc.or_(pc.less(ahead[key], behind[key]), pc.and_(pc.equal(ahead[key], behind[key]), in_order))
    if pc.all(in_order).as_py() is not False:
        return table
    return table.sort_by([(k, "ascending") for k in keys])


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
    """The results of one sweep folder: every trial's row in memory, and the other tables' rows of the trials that
    may still change; flush rewrites the parts of the trials that changed.

    Rows are keyed (trial_id; trial_id+epoch; ...), so a result that arrives twice, as it
    does after a resume re-runs an epoch, replaces the earlier row instead of duplicating it.

    A trial's epoch, confusion and per-class rows leave memory once it has ended and they are written
    (release_trial), so what the driver holds does not grow with the sweep beyond one row a trial (with them,
    10,000 trials of 20 epochs held 1.8 GB; bench/RESULTS.md section 8). A store opened on a folder of parts reads only
    its trials' rows. Rows on disk only are read back from the trial's part when the trial reports again (a
    resume re-runs it from a checkpoint).

    A trial that ended (end_trial) has its rows released after the next flush; one that ended for good and
    has no part of its own in a table goes, in that flush, into the one new sealed part of that table with the
    others that did (see the module's docstring).
    """

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.trials: dict[str, dict] = {}
        self.epochs: dict[str, dict[int, dict]] = {}  # trial_id -> epoch -> row
        self.confusion: dict[str, list[dict]] = {}
        self.per_class: dict[str, list[dict]] = {}
        self._on_disk: dict[str, set[str]] = {
            name: set() for name in RESULT_FILES if name != TRIALS
        }  # trials whose rows of that table are in its part only
        self._dirty: set[tuple[str, str]] = set()  # (table, trial_id) whose part is to be rewritten
        self._ended: dict[str, bool] = {}  # trials that ended since the last flush (end_trial): whether for good
        self._schemas: dict[str, pa.Schema] = {}  # every column each table's parts hold, as its schema part says
        self._single_files = [name for name in RESULT_FILES if (self.folder / name).is_file()]  # the layout before parts
        self._own: dict[str, set[str]] = {}  # trials with a part of their own in the table's folder
        self._sealed: dict[str, dict[str, str]] = {}  # trials whose rows are in one of the table's sealed parts: which
        self._generation: dict[str, int] = {}  # the table's newest sealed part's
        for name in RESULT_FILES:
            self._list_parts(name)
            schema_part = self.folder / name / SCHEMA_PART
            if name != TRIALS and schema_part.is_file():  # parts: the trials that have one, and the columns, without their rows
                self._schemas[name] = pq.read_schema(schema_part)
                self._on_disk[name] = self._own[name] | set(self._sealed[name])
                continue
            table = read_table(self.folder, name)
            if table is not None:
                self._schemas[name] = table.schema
                self._load(name, table.to_pylist())

    def _list_parts(self, name: str) -> None:
        """Which trials have a part of their own in one table's folder, which are in a sealed part, and the newest generation."""
        try:
            names = _parquet_names(self.folder / name)
        except (FileNotFoundError, NotADirectoryError):
            names = []
        self._own[name] = {n[len(TRIAL_PREFIX) : -len(".parquet")] for n in names if n.startswith(TRIAL_PREFIX)}
        self._sealed[name] = sealed_parts(self.folder, name) if _sealed(names) else {}
        self._generation[name] = max((_generation(n) for n in _sealed(names)), default=0)

    def _load(self, name: str, rows: list[dict]) -> None:
        for row in rows:
            tid = row["trial_id"]
            if name == TRIALS:
                self.trials[tid] = row
            elif name == EPOCHS:
                self.epochs.setdefault(tid, {})[int(row["epoch"])] = row
            else:
                self._by_trial(name).setdefault(tid, []).append(row)

    def _by_trial(self, name: str) -> dict[str, list[dict]]:
        return {CONFUSION: self.confusion, PER_CLASS: self.per_class}[name]

    def _read_back(self, name: str, trial_id: str) -> None:
        """A trial's rows of one table into memory again from its part, when they are on disk only."""
        if trial_id in self._on_disk.get(name, ()):
            self._on_disk[name].discard(trial_id)
            path = self.folder / name
            try:
                if trial_id in self._sealed[name]:  # the newest sealed part that holds it (locally, the only one)
                    table = pq.read_table(path / self._sealed[name][trial_id], filters=[("trial_id", "==", trial_id)])
                else:
                    table = _read_part(path / part_name(trial_id))
                self._load(name, table.to_pylist())
            except (FileNotFoundError, ValueError):
                pass  # removed since (by hand): nothing to keep

    def release_trial(self, trial_id: str) -> None:
        """An ended trial's epoch, confusion and per-class rows leave memory, once written (its row stays)."""
        for name, rows in ((EPOCHS, self.epochs), (CONFUSION, self.confusion), (PER_CLASS, self.per_class)):
            if trial_id in rows and (name, trial_id) not in self._dirty and name not in self._single_files:
                del rows[trial_id]
                self._on_disk[name].add(trial_id)

    def end_trial(self, trial_id: str, for_good: bool) -> None:
        """The trial ended: its epoch, confusion and per-class rows leave memory after the next flush (release_trial).
        for_good: it completed, stopped early or diverged (an errored one runs again at a resume); then the next flush
        writes its rows that have no part of their own into a sealed part, with those of the others that ended so."""
        self._ended[trial_id] = for_good

    def rows_in_memory(self) -> dict[str, int]:
        """How many rows of each table are held in memory (the rest are in their parts only)."""
        return {
            TRIALS: len(self.trials),
            EPOCHS: sum(map(len, self.epochs.values())),
            CONFUSION: sum(map(len, self.confusion.values())),
            PER_CLASS: sum(map(len, self.per_class.values())),
        }

    def put_trial(self, row: dict) -> None:
        """Insert or replace a trial's row (keeps columns it already had that row lacks)."""
        old = self.trials.get(row["trial_id"], {})
        self.trials[row["trial_id"]] = {**old, **{k: v for k, v in row.items() if v is not None or k not in old}}
        self._dirty.add((TRIALS, row["trial_id"]))

    def put_epoch(self, trial_id: str, metrics: dict) -> None:
        """Insert or replace one epoch's row of a trial."""
        row = {"trial_id": trial_id, **{c: metrics.get(c) for c in EPOCH_COLUMNS[1:]}}
        row["epoch"] = int(row["epoch"])
        self._read_back(EPOCHS, trial_id)  # the part is rewritten whole: with the epochs before this one
        self.epochs.setdefault(trial_id, {})[row["epoch"]] = row
        self._dirty.add((EPOCHS, trial_id))

    def put_confusion(self, trial_id: str, classes: list[str], matrix: list[list[int]]) -> None:
        """Replace a trial's confusion counts, stored long: one row per (true, predicted) cell with a non-zero count."""
        self._on_disk[CONFUSION].discard(trial_id)  # replaced whole: the rows on disk need not be read
        self.confusion[trial_id] = [
            {"trial_id": trial_id, "true_label": classes[t], "pred_label": classes[p], "count": int(n)}
            for t, row in enumerate(matrix)
            for p, n in enumerate(row)
            if n
        ]
        self._dirty.add((CONFUSION, trial_id))

    def put_per_class(self, trial_id: str, rows: list[dict]) -> None:
        """Replace a trial's per-class precision/recall rows."""
        self._on_disk[PER_CLASS].discard(trial_id)
        self.per_class[trial_id] = [{"trial_id": trial_id, **r} for r in rows]
        self._dirty.add((PER_CLASS, trial_id))

    def drop_trial(self, trial_id: str) -> None:
        """Remove every row of a trial from every table (its parts are removed at the next flush)."""
        for name, rows in ((TRIALS, self.trials), (EPOCHS, self.epochs), (CONFUSION, self.confusion), (PER_CLASS, self.per_class)):
            on_disk = trial_id in self._on_disk.get(name, ())
            self._on_disk.get(name, set()).discard(trial_id)
            if rows.pop(trial_id, None) is not None or on_disk:
                self._dirty.add((name, trial_id))

    def trial_status(self, trial_id: str) -> str | None:
        """The stored status of a trial, or None when it has no row."""
        row = self.trials.get(trial_id)
        return None if row is None else row["status"]

    def _rows(self, name: str, trial_id: str) -> list[dict]:
        self._read_back(name, trial_id)
        if name == TRIALS:
            return [self.trials[trial_id]] if trial_id in self.trials else []
        if name == EPOCHS:
            return [row for _, row in sorted(self.epochs.get(trial_id, {}).items())]
        return self._by_trial(name).get(trial_id, [])

    def flush(self) -> list[str]:
        """Rewrite the part of every trial whose rows changed since the last flush, each atomically; return the files written or removed, relative to the folder.

        What a flush writes is the changed trials' own rows: it does not grow with the rows already stored.
        """
        changed = self._leave_single_files()
        for name in RESULT_FILES:  # a sealed trial that changed gets its own part again first (regroup), then is written as any other
            unsealed = {tid for n, tid in self._dirty if n == name} & set(self._sealed[name])
            if unsealed:
                changed += regroup(self.folder, name, set(self._sealed[name]) - unsealed)
                self._list_parts(name)
                for tid in unsealed:  # where the swap failed, its own part is written anyway: asl-tune's readers take that
                    self._sealed[name].pop(tid, None)
        for name in RESULT_FILES:
            changed += self._write_sealed(name)
        for name, trial_id in sorted(self._dirty):
            changed += self._write_part(name, trial_id)
            self._dirty.discard((name, trial_id))  # only once written: a failed flush is retried whole by the next
        for trial_id in list(self._ended):
            self.release_trial(trial_id)
            del self._ended[trial_id]
        return changed

    def _write_sealed(self, name: str) -> list[str]:
        """One new sealed part with the rows of one table of the trials that ended for good with no part there yet."""
        ids = sorted(
            tid
            for n, tid in self._dirty
            if n == name and self._ended.get(tid) and tid not in self._own[name] and tid not in self._sealed[name]
        )
        rows = [row for tid in ids for row in self._rows(name, tid)]  # in trial order, as compact writes them
        if not rows:
            return []
        part = sealed_name(self._generation[name] + 1)
        written = self._write_rows(name, part, rows)
        self._generation[name] += 1
        for tid in ids:
            self._sealed[name][tid] = part
            self._dirty.discard((name, tid))
        return written

    def _write_part(self, name: str, trial_id: str) -> list[str]:
        """Write (or, with no rows left, remove) one trial's part of one table."""
        rows = self._rows(name, trial_id)
        part = part_name(trial_id)
        if not rows:
            (self.folder / name / part).unlink(missing_ok=True)
            self._own[name].discard(trial_id)
            return [f"{name}/{part}"]
        written = self._write_rows(name, part, rows)
        self._own[name].add(trial_id)
        return written

    def _write_rows(self, name: str, part: str, rows: list[dict]) -> list[str]:
        """Write rows as one part of one table, its schema part first when the table gains a column; the files written."""
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        table = pa.Table.from_pylist(rows)
        known = self._schemas.get(name)
        wider = table.schema if known is None else pa.unify_schemas([known, table.schema], promote_options="permissive")
        written = []
        if known is None or not wider.equals(known) or not (folder / SCHEMA_PART).exists():
            write_atomic(wider.empty_table(), folder / SCHEMA_PART)  # before the part: a reader never meets a column it lacks
            self._schemas[name] = wider
            written.append(f"{name}/{SCHEMA_PART}")
        write_atomic(table.cast(pa.schema([wider.field(c) for c in table.column_names])), folder / part)
        return [*written, f"{name}/{part}"]

    def _leave_single_files(self) -> list[str]:
        """Move tables kept as one file (the layout before parts) to parts: remove the file; every trial's part is written next."""
        changed = []
        for name in self._single_files:
            (self.folder / name).unlink(missing_ok=True)
            self._schemas.pop(name, None)
            self._dirty.update(
                (name, tid) for tid in {**self.trials, **self.epochs, **self.confusion, **self.per_class} if self._rows(name, tid)
            )
            changed.append(name)
        self._single_files = []
        return changed


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
