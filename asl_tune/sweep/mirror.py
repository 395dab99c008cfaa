"""Sweeps whose `--results` is a URI (s3://, gs://, file:///...): a local working copy, mirrored to the URI.

A running sweep needs local files: the Optuna study is SQLite, which cannot live on object storage, and
the lock is an flock. So when `--results` is a URI the sweep runs in a staging folder on the driver,

    <cache>/sweeps/<hash of the URI>/<name>/        (<cache>: see data.cache_root, $ASL_TUNE_CACHE)

and its small files (sweep.json, space.yaml, study.db, *.parquet) are copied to `<URI>/<name>/` whenever
they change: at the start, after every results flush and every step of Tune's loop, and at the end.
Ray's checkpoints and experiment state go to `<URI>/<name>/run-<k>/` through Ray's own storage layer.

The URI is the record: `resume`, `sweep --extend` and `analyze` first copy the sweep's files down from it,
so they work from a machine whose staging folder is empty or stale.

Copies are whole files and a reader never sees a torn one: an object-store PUT is atomic, and on a
filesystem (file://, hdfs://) the copy is written under a temporary name and moved over the target.
study.db is copied through SQLite's backup API, so each copy is a consistent snapshot.

The lock only excludes a second driver on the same machine: two machines running the same URI sweep at
once are not detected (object stores have no locks).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from asl_tune.errors import AslTuneError
from asl_tune.results import is_plain_name

log = logging.getLogger(__name__)

OBJECT_STORES = ("s3", "gcs", "abfs")  # pyarrow filesystems where one PUT replaces an object atomically
ANALYZE_DIR = ".analyze"  # analyze's own copies, beside (never inside) a running sweep's staging folder
_SQLITE_SIDE_FILES = ("-journal", "-wal", "-shm")


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
        raise AslTuneError(f"{option}: must be a folder or a URI pyarrow's filesystems open (s3://bucket/path, gs://bucket/path, file:///path), got {uri} ({_why(e)})") from None


def staging_root(uri: str) -> Path:
    """The driver-local folder that holds working copies of the sweeps under one results URI."""
    from asl_tune.data import cache_root

    return cache_root() / "sweeps" / hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:12]


class Mirror:
    """One sweep folder at `<uri>/<name>/` and its local working copy (staging folder).

    The staging folder is worked out afresh in each process (it is not pickled), so a Tune callback or
    study storage restored on another machine, under another cache folder, finds that machine's copy.
    """

    def __init__(self, uri: str, name: str, files: tuple[str, ...]):
        self.uri = uri.rstrip("/")
        self.name = name
        self.files = tuple(files)  # the small files that are mirrored
        self._fs = None
        self._path = ""
        self._pushed: dict[str, tuple[int, int]] = {}  # name -> (mtime_ns, size) of the local file last copied up
        self._made_dir = False
        self._warned = False

    def __getstate__(self) -> dict:
        return {"uri": self.uri, "name": self.name, "files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["uri"], state["name"], state["files"])

    @property
    def remote(self) -> str:
        """The sweep folder's URI."""
        return join(self.uri, self.name)

    @property
    def folder(self) -> Path:
        """The local working copy, in this process's cache folder."""
        return staging_root(self.uri) / self.name

    @property
    def fs(self):
        if self._fs is None:
            self._fs, self._path = open_uri(self.remote)
            self._path = self._path.rstrip("/")
        return self._fs

    def _at(self, name: str) -> str:
        self.fs  # noqa: B018 (opens the filesystem, sets _path)
        return f"{self._path}/{name}"

    def _fail(self, doing: str, e: BaseException) -> AslTuneError:
        return AslTuneError(f"--results: cannot {doing} {self.remote}: {_why(e)}")

    def present(self, names: tuple[str, ...] | list[str] | None = None) -> list[str]:
        """Which of the named files (default: all mirrored ones) exist at the URI."""
        import pyarrow.fs

        names = list(names or self.files)
        try:
            infos = self.fs.get_file_info([self._at(n) for n in names])
        except (OSError, ValueError) as e:
            raise self._fail("read", e) from None
        return [n for n, info in zip(names, infos) if info.type == pyarrow.fs.FileType.File]

    def fetch(self, names, dest: Path) -> list[str]:
        """Copy those of the named files that exist at the URI into dest, each whole (temporary file, rename); return them."""
        found = self.present(names)
        dest.mkdir(parents=True, exist_ok=True)
        for name in found:
            tmp = dest / f".{name}.tmp{os.getpid()}"
            try:
                with self.fs.open_input_stream(self._at(name)) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
                if name.endswith(".db"):  # a stale journal would be rolled back into the new file
                    for side in _SQLITE_SIDE_FILES:
                        (dest / f"{name}{side}").unlink(missing_ok=True)
                os.replace(tmp, dest / name)
            except (OSError, ValueError) as e:
                tmp.unlink(missing_ok=True)
                raise self._fail(f"copy {name} from", e) from None
        return found

    def pull(self) -> None:
        """Make the staging folder a copy of the URI's files: fetch those there, delete local ones that are not."""
        folder = self.folder
        found = self.fetch(self.files, folder)
        for name in self.files:
            if name in found:
                st = (folder / name).stat()
                self._pushed[name] = (st.st_mtime_ns, st.st_size)
            else:
                (folder / name).unlink(missing_ok=True)
                self._pushed.pop(name, None)

    def sync(self, final: bool = False) -> None:
        """Copy every mirrored file that changed since its last copy up to the URI.

        A failure mid-sweep is logged once and retried at the next sync (a network hiccup must not end a
        sweep of hours); with final=True it is raised, since the URI would be left behind.
        """
        try:
            for name in self.files:
                self._push(name)
        except (OSError, ValueError, sqlite3.Error) as e:
            if final:
                raise AslTuneError(f"--results: cannot copy the results to {self.remote} ({_why(e)}); they are complete in {self.folder}") from None
            if not self._warned:
                log.warning("results: cannot copy to %s now (%s); will retry", self.remote, _why(e))
                self._warned = True

    def _push(self, name: str) -> None:
        src = self.folder / name
        try:
            st = src.stat()
        except FileNotFoundError:
            return
        key = (st.st_mtime_ns, st.st_size)
        if self._pushed.get(name) == key:
            return
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

    def _upload(self, src: Path, name: str) -> None:
        fs = self.fs
        if not self._made_dir:
            fs.create_dir(self._path, recursive=True)
            self._made_dir = True
        target = self._at(name)
        atomic = fs.type_name in OBJECT_STORES
        dest = target if atomic else self._at(f".{name}.tmp{os.getpid()}")
        try:
            with open(src, "rb") as f, fs.open_output_stream(dest) as out:
                shutil.copyfileobj(f, out, 1 << 20)
            if not atomic:
                fs.move(dest, target)  # a rename: a reader sees the old file or the new, never a torn one
        except BaseException:
            if not atomic:
                try:
                    fs.delete_file(dest)
                except (OSError, ValueError):
                    pass
            raise


def fetch_for_analysis(uri: str, names, files: tuple[str, ...]) -> Path:
    """Copy the named sweeps' result files from `<uri>/<name>/` to `<staging>/.analyze/<name>/`; return `<staging>/.analyze`.

    Every name is checked at the URI before anything is written. The copies are analyze's own, so they
    never touch the working copy of a sweep this machine is running.
    """
    open_uri(uri)
    mirrors = []
    for name in names:
        if not is_plain_name(name):
            raise AslTuneError(f"{join(uri, name)}: no such sweep folder")
        mirror = Mirror(uri, name, files)
        if not mirror.present():
            raise AslTuneError(f"{mirror.remote}: no such sweep folder (none of {', '.join(files)} there)")
        mirrors.append(mirror)
    root = staging_root(uri) / ANALYZE_DIR
    for mirror in mirrors:
        dest = root / mirror.name
        for name in files:
            (dest / name).unlink(missing_ok=True)
        mirror.fetch(files, dest)
    return root
