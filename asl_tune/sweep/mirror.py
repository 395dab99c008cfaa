"""Where a sweep's files live: its folder, or for a `--results` URI (s3://, gs://, file:///...) a local working copy mirrored there.

`sweep_folder(results, name, files)` gives one object either way, with the same methods, so the sweep code
never asks which it holds: `SweepFolder` is a folder on this machine, the record itself (pull and sync have
nothing to do); `MirroredSweepFolder` keeps a working copy of `<URI>/<name>/` and copies it.

A running sweep needs local files: the Optuna study is a file appended to (an object cannot be appended to),
and the lock is an flock. So when `--results` is a URI the sweep runs in a staging folder on the driver,

    <cache>/sweeps/<hash of the URI>/<name>/        (<cache>: see data.cache_root, $ASL_TUNE_CACHE)

and its small files (sweep.json, space.yaml, study.log, and the parts in the *.parquet folders) are copied to
`<URI>/<name>/` whenever they change: at the start, after every results flush and every step of Tune's loop,
and at the end. A file that grows with the sweep (study.log: 20 MB at 10,000 trials) is copied whole, so a
file whose copy took over 50 ms is copied again no sooner than its last copy took / COPY_SHARE: copies take
at most a twentieth of the time, however large the file gets (the end of the sweep copies everything). The study at the URI may then be
behind Tune's state there; `resume` reconciles the two (study.StudySearch). A flush names the parts it wrote or removed (results.ResultsStore.flush), and only those are
copied or removed there, so a copy costs the same in a sweep of 10 trials and of 10,000.
Ray's checkpoints and experiment state go to `<URI>/<name>/run-<k>/` through Ray's own storage layer.

The URI is the record: `resume`, `sweep --extend` and `analyze` first copy the sweep's files down from it,
so they work from a machine whose staging folder is empty or stale.

Copies are whole files and a reader never sees a torn one: an object-store PUT is atomic, and on a
filesystem (file://, hdfs://) the copy is written under a temporary name and moved over the target
(files.write_atomically), as is every copy down.
study.db (the study of sweeps made before study.log) is copied through SQLite's backup API, so each copy is
a consistent snapshot; study.log only ever grows by whole appends, and its readers skip an unfinished line.

The lock only excludes a second driver on the same machine: two machines running the same URI sweep at
once are not detected (object stores have no locks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import shutil
import sqlite3
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically
from asl_tune.results import is_plain_name

log = logging.getLogger(__name__)

OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow filesystems where one PUT replaces an object atomically
ANALYZE_DIR = ".analyze"  # analyze's own copies, beside (never inside) a running sweep's staging folder
DEFAULT_RESULTS = "results"  # --results when not given: suggested commands leave it out
_SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")
COPY_SHARE = 0.05  # the most of the sweep's time that copying one of the mirrored files up may take (see above)


def is_uri(results) -> bool:
    """Whether a --results value is a URI rather than a folder."""
    return "://" in str(results)


def join(uri: str, *parts: str) -> str:
    """uri/part/...: the parts go before any ?query (s3://bucket/path?region=x)."""
    base, q, query = uri.partition("?")
    return "/".join([base.rstrip("/"), *parts]) + q + query


def _why(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__


def open_uri(uri: str, option: str = "--results"):
    """pyarrow's filesystem and path for uri; refuse, in one line, a URI pyarrow cannot open."""
    import pyarrow
    import pyarrow.fs

    try:
        return pyarrow.fs.FileSystem.from_uri(uri)
    except (pyarrow.ArrowException, ValueError, OSError) as e:
        raise AslTuneError(
            f"{option}: must be a folder or a URI pyarrow's filesystems open (s3://bucket/path, gs://bucket/path, file:///path), got {uri} ({_why(e)})"
        ) from None


def staging_root(uri: str) -> Path:
    """The driver-local folder that holds working copies of the sweeps under one results URI."""
    from asl_tune.data import cache_root

    return cache_root() / "sweeps" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]


def sweep_folder(results: Path | str, name: str, files: tuple[str, ...], for_analysis: bool = False) -> "SweepFolder":
    """The sweep `name` under --results: a SweepFolder, or for a URI a MirroredSweepFolder copying `files`.

    for_analysis: a URI's files are copied to analyze's own folder, never to a running sweep's working copy.
    """
    if is_uri(results):
        return MirroredSweepFolder(str(results), name, files, ANALYZE_DIR if for_analysis else "")
    return SweepFolder(Path(results), name)


def as_sweep_folder(folder: "SweepFolder | Path | str") -> "SweepFolder":
    """folder as a SweepFolder: a path is a sweep folder on this machine."""
    if isinstance(folder, SweepFolder):
        return folder
    return SweepFolder(Path(folder).parent, Path(folder).name)


class SweepFolder:
    """A sweep's folder on this machine, `<results>/<name>/`: where its driver reads and writes, and the record itself.

    MirroredSweepFolder has the same methods for results at a URI. Here there is nothing to copy: pull and
    sync do nothing. Pickled (Tune keeps the recorder and the study's storage in its experiment state) as the
    two paths it was given.
    """

    def __init__(self, results: Path, name: str):
        self._results = Path(results)
        self._name = name

    @property
    def path(self) -> Path:
        """The folder the driver reads and writes."""
        return self.root / self._name

    @property
    def name(self) -> str:
        return self._name

    @property
    def results(self) -> Path | str:
        """--results: the folder, or the URI, that holds the sweep folders."""
        return self._results

    @property
    def root(self) -> Path:
        """The folder on this machine that holds `path` (and its sister sweeps' copies)."""
        return self._results

    @property
    def location(self) -> str:
        """The sweep folder as the user names it."""
        return str(self.path)

    @property
    def described(self) -> str:
        """Where the results go, for "results in ..."."""
        return self.location

    @property
    def results_flag(self) -> str:
        """` --results R` for commands suggested to the user, unless R is the default."""
        return "" if str(self.results) == DEFAULT_RESULTS else f" --results {self.results}"

    @property
    def ray_storage(self) -> str | None:
        """Where Ray keeps the sweep's runs unless --storage says otherwise; None: in the sweep folder."""
        return None

    def results_lines(self) -> list[str]:
        """What a finished run prints about where its results are and what to run next."""
        return [
            f"results: {self.location}/trials.parquet, epochs.parquet, confusion.parquet; next: asl-tune analyze {self.name}{self.results_flag}"
        ]

    def writable_places(self) -> list[tuple[Path, str]]:
        """The folders a sweep will write, each with how to refuse it when it cannot be written."""
        return [(Path(self.results), "--results: cannot write to")]

    @contextmanager
    def peek(self, names: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
        """A folder holding the named files as the record has them, and how to name it, for reading before the lock is held."""
        yield self.path, self.location

    def check_present(self) -> None:
        """Refuse, in one line, a sweep that is not there (a folder is checked where it is read: analysis.compute.load_sweep)."""

    def pull(self) -> None:
        """Bring the local folder up to date with the record; a folder is the record."""

    def sync(self, final: bool = False, changed: list[str] | tuple[str, ...] | None = None) -> None:
        """Copy what changed locally to the record (changed: the result files written or removed, see MirroredSweepFolder); a folder is the record."""


class MirroredSweepFolder(SweepFolder):
    """A sweep folder at `<uri>/<name>/` and its local working copy (staging folder), which is what `path` gives.

    The working copy is worked out afresh in each process (only the URI, the name, the files and `copies` are
    pickled), so a Tune callback or study storage restored on another machine, under another cache folder,
    finds that machine's copy.
    """

    def __init__(self, uri: str, name: str, files: tuple[str, ...], copies: str = ""):
        self.uri = uri.rstrip("/")
        self._name = name
        self.files = tuple(files)  # the small files that are mirrored
        self.copies = copies  # the working copy's folder under the staging root: "" for a sweep's, ANALYZE_DIR for analyze's
        self._fs = None
        self._at_path = ""
        self._pushed: dict[str, tuple[int, int]] = {}  # path in the folder -> (mtime_ns, size) of the local file last copied up
        self._made_dirs: set[str] = set()  # folders at the URI known to exist
        self._next_copy: dict[str, float] = {}  # file in self.files -> time.monotonic() before which it is not copied again (COPY_SHARE)
        self._warned = False

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "name": self._name, "files": self.files, "copies": self.copies}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["name"], state["files"], state.get("copies", ""))

    @property
    def root(self) -> Path:
        """This process's staging folder for the URI (for analyze, its folder of copies there)."""
        return staging_root(self.uri) / self.copies

    @property
    def results(self) -> str:
        return self.uri

    @property
    def location(self) -> str:
        """The sweep folder's URI."""
        return join(self.uri, self._name)

    @property
    def described(self) -> str:
        return f"{self.location} (working copy {self.path})"

    @property
    def ray_storage(self) -> str:
        """Ray's runs go to the URI too, at `<uri>/<name>/run-<k>/`."""
        return self.uri

    def results_lines(self) -> list[str]:
        return [*super().results_lines(), f"(working copy: {self.path})"]

    def writable_places(self) -> list[tuple[Path, str]]:
        places = [(self.path.parent, "--results: cannot keep the working copy in")]
        if self.fs.type_name == "local":  # file://: the "bucket" is a folder here
            places.append((Path(self._at_path).parent, "--results: cannot write to"))
        return places

    @contextmanager
    def peek(self, names: tuple[str, ...]) -> Iterator[tuple[Path, str]]:
        """The named files copied to a temporary folder, so nothing is written to the working copy before the lock is held (nor when the request is refused)."""
        with tempfile.TemporaryDirectory(prefix="asl-tune-peek-") as tmp:
            self.fetch(names, Path(tmp))
            yield Path(tmp), self.location

    def check_present(self) -> None:
        if not is_plain_name(self._name):
            raise AslTuneError(f"{self.location}: no such sweep folder")
        if not self.present():
            raise AslTuneError(f"{self.location}: no such sweep folder (none of {', '.join(self.files)} there)")

    @property
    def fs(self):
        """pyarrow's filesystem for the URI, opened on first use (a URI it cannot open is refused naming --results)."""
        if self._fs is None:
            self._fs, base = open_uri(self.uri)
            self._at_path = f"{base.rstrip('/')}/{self._name}"
        return self._fs

    def _at(self, name: str) -> str:
        self.fs  # noqa: B018 (opens the filesystem, sets _at_path)
        return f"{self._at_path}/{name}"

    def _fail(self, doing: str, e: BaseException) -> AslTuneError:
        return AslTuneError(f"--results: cannot {doing} {self.location}: {_why(e)}")

    def present(self, names: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """Which of the named files or folders (default: all mirrored ones) exist at the URI."""
        import pyarrow.fs

        names = list(names or self.files)
        try:
            infos = self.fs.get_file_info([self._at(n) for n in names])
        except (OSError, ValueError) as e:
            raise self._fail("read", e) from None
        return [n for n, info in zip(names, infos) if info.type in (pyarrow.fs.FileType.File, pyarrow.fs.FileType.Directory)]

    def _listing(self, name: str) -> list[str] | None:
        """The files in the URI's folder `name` (hidden ones left out), or None when `name` is a file there."""
        import pyarrow.fs

        at = self._at(name)
        if self.fs.get_file_info(at).type != pyarrow.fs.FileType.Directory:
            return None
        infos = self.fs.get_file_info(pyarrow.fs.FileSelector(at))
        return sorted(
            posixpath.basename(i.path)
            for i in infos
            if i.type == pyarrow.fs.FileType.File and not posixpath.basename(i.path).startswith(".")
        )

    def fetch(self, names, dest: Path) -> list[str]:
        """Copy those of the named files (a folder: every file in it) that exist at the URI into dest, each whole (temporary file, rename); return them."""
        found = self.present(names)
        dest.mkdir(parents=True, exist_ok=True)
        for name in found:
            try:
                listing = self._listing(name)
                _make_room(dest / name, folder=listing is not None)
                for path in [name] if listing is None else [f"{name}/{f}" for f in listing]:
                    write_atomically(dest / path, lambda tmp: self._download(path, tmp))
                for stale in set(_files_in(dest / name)) - set(listing or ()):
                    (dest / name / stale).unlink(missing_ok=True)
            except (OSError, ValueError) as e:
                raise self._fail(f"copy {name} from", e) from None
        return found

    def _download(self, name: str, to: Path) -> None:
        """Copy the URI's file `name` to `to`, the temporary that is then renamed to `name` beside it."""
        with self.fs.open_input_stream(self._at(name)) as src, open(to, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
        if name.endswith(".db"):  # a stale journal beside the old file would be rolled back into the new one
            for side in _SQLITE_SIDE_FILES:
                (to.parent / f"{name}{side}").unlink(missing_ok=True)

    def pull(self) -> None:
        """Make the working copy a copy of the URI's files: fetch those there, delete local ones that are not."""
        folder = self.path
        found = self.fetch(self.files, folder)
        self._pushed.clear()
        for name in self.files:
            if name not in found:
                _make_room(folder / name, folder=False)
                (folder / name).unlink(missing_ok=True)
                continue
            inside = _files_in(folder / name)
            for path in [name] if (folder / name).is_file() else [f"{name}/{f}" for f in inside]:
                st = (folder / path).stat()
                self._pushed[path] = (st.st_mtime_ns, st.st_size)

    def sync(self, final: bool = False, changed: list[str] | tuple[str, ...] | None = None) -> None:
        """Copy every mirrored file that changed since its last copy up to the URI.

        changed: the files in the results folders written or removed since the last sync (what
        ResultsStore.flush returns), copied or removed there; the folders are then not looked through
        (a sweep of 10,000 trials has 20,000 parts). None: every file is looked at.
        A failure mid-sweep is logged once and retried at the next sync (a network hiccup must not end a
        sweep of hours); with final=True it is raised, since the URI would be left behind.
        """
        try:
            for name in self.files:
                if not final and time.monotonic() < self._next_copy.get(name, 0.0):
                    continue  # its last copy was recent, for what it costs; looked at again at the next sync
                if changed is None or not (self.path / name).is_dir():
                    self._push(name, listed=False)
            for path in changed or ():
                self._push(path, listed=True)
        except (OSError, ValueError, sqlite3.Error) as e:
            if final:
                raise AslTuneError(
                    f"--results: cannot copy the results to {self.location} ({_why(e)}); they are complete in {self.path}"
                ) from None
            if not self._warned:
                log.warning("results: cannot copy to %s now (%s); will retry", self.location, _why(e))
                self._warned = True

    def _push(self, name: str, listed: bool) -> None:
        """Copy one file up if it changed since its last copy; a folder, file by file. listed: named by the writer, so gone here means remove it there."""
        src = self.path / name
        try:
            st = src.stat()
        except FileNotFoundError:
            if listed:
                self._remove(name)
            return
        if src.is_dir():
            inside = _files_in(src)
            for f in inside:
                self._push(f"{name}/{f}", listed=False)
            for stale in set(self._listing(name) or ()) - set(inside):
                self._remove(f"{name}/{stale}")
            return
        key = (st.st_mtime_ns, st.st_size)
        if self._pushed.get(name) == key:
            return
        started = time.monotonic()
        if name.endswith(".db"):
            with tempfile.TemporaryDirectory(prefix="asl-tune-db-") as tmp:
                snapshot = Path(tmp) / name
                db, out = sqlite3.connect(src), sqlite3.connect(snapshot)
                try:
                    db.backup(out)  # a consistent snapshot, even while Optuna writes
                finally:
                    out.close()
                    db.close()
                self._upload(snapshot, name)
        else:
            self._upload(src, name)
        self._pushed[name] = key
        now = time.monotonic()
        if name in self.files and (now - started) / COPY_SHARE >= 1.0:  # a copy under 50 ms: copied whenever it changes
            self._next_copy[name] = now + (now - started) / COPY_SHARE

    def _remove(self, name: str) -> None:
        """Remove the URI's file `name`, if it is a file there (a folder of parts that replaced it is left alone)."""
        import pyarrow.fs

        self._pushed.pop(name, None)
        if self.fs.get_file_info(self._at(name)).type == pyarrow.fs.FileType.File:
            self.fs.delete_file(self._at(name))

    def _upload(self, src: Path, name: str) -> None:
        fs = self.fs
        folder = posixpath.dirname(self._at(name))
        if folder not in self._made_dirs:
            if folder != self._at_path:
                self._remove(posixpath.dirname(name))  # a results file from before parts, where their folder goes
            fs.create_dir(folder, recursive=True)
            self._made_dirs.add(folder)

        def put(dest: str) -> None:
            with open(src, "rb") as f, fs.open_output_stream(dest) as out:
                shutil.copyfileobj(f, out, 1 << 20)

        if fs.type_name in OBJECT_STORES:
            put(self._at(name))  # one PUT replaces the object whole
        else:
            write_atomically(self._at(name), put, fs=fs)  # a rename: a reader sees the old file or the new, never a torn one


def _files_in(folder: Path) -> list[str]:
    """The names of the files in a local folder, hidden ones (temporaries) left out; none when it is not a folder."""
    try:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith("."))
    except (FileNotFoundError, NotADirectoryError):
        return []


def _make_room(path: Path, folder: bool) -> None:
    """Clear `path` for what is copied down: a file where a folder comes, a folder where a file (or nothing) does."""
    if folder:
        if path.is_file():
            path.unlink()
        path.mkdir(parents=True, exist_ok=True)
    elif path.is_dir():
        shutil.rmtree(path)
