"""Writing a file or a folder whole or not at all: into a temporary name beside it, then one rename.

A rename within one filesystem replaces its target in one step, so a reader, or whatever runs after a
crash, finds the old file or the new one and never a torn one. The temporary is hidden (`.NAME.tmpPID`),
so a listing of the folder never shows it as a result, and it names its process, so two processes
writing the same target never share one; one process writes a given target from one thread at a time.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shutil
from pathlib import Path
from typing import Callable

# What rename(2) says when the target is in the way: a non-empty folder (ENOTEMPTY, EEXIST), or a folder
# and a file meeting (ENOTDIR, EISDIR).
_TAKEN = (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR)


def write_atomically(path: Path | str, write: Callable, error: Callable[[OSError], Exception] | None = None, fs=None) -> None:
    """Make `path` by `write(tmp)`, then rename tmp over it; on any failure tmp is removed and path stays as it was.

    `write` receives the temporary's path and makes a file or a folder there. A folder cannot replace a
    non-empty folder (nor a folder a file): that rename raises FileExistsError, for the caller to decide
    (another process may have made the same folder first). `error` turns an OSError into the caller's own
    exception, raised from it. `fs`: the pyarrow filesystem `path` is on (file://, hdfs://); default this
    machine's, where path is a Path.
    """
    if fs is None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        _discard(tmp)  # a leftover of a killed writer that had this process's id
    else:
        head, base = posixpath.split(str(path))
        tmp = posixpath.join(head, f".{base}.tmp{os.getpid()}")
    try:
        write(tmp)
        _rename(tmp, path, fs)
    except BaseException as e:
        _discard(tmp, fs)
        if error is not None and isinstance(e, OSError):
            raise error(e) from e
        raise


def _rename(tmp, path, fs) -> None:
    if fs is not None:
        fs.move(tmp, path)
        return
    try:
        os.replace(tmp, path)
    except OSError as e:
        if e.errno in _TAKEN:
            raise FileExistsError(e.errno, e.strerror, str(path)) from None
        raise


def _discard(tmp, fs=None) -> None:
    """Remove a temporary file or folder, if there is one; never raises (it runs while another error is raised)."""
    try:
        if fs is not None:
            fs.delete_file(tmp)
        elif tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except (OSError, ValueError):
        pass
