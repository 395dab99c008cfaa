"""files.write_atomically: a target is replaced whole or left as it was, and no temporary is left behind,
with real failures (a file-size limit the kernel enforces, a folder in the way), never simulated ones."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pyarrow.fs
import pytest

from asl_tune.files import write_atomically


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")
    seen = []
    write_atomically(target, lambda tmp: (seen.append(tmp), tmp.write_text("new")))
    assert target.read_text() == "new"
    assert (
        seen[0].parent == tmp_path and seen[0].name.startswith(".") and str(os.getpid()) in seen[0].name
    )  # hidden, beside, this process's
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_write_the_kernel_refuses_keeps_the_old_file_and_becomes_the_callers_error(tmp_path):
    """RLIMIT_FSIZE makes write(2) fail with EFBIG part-way, after part of the new file is on disk."""
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old weights")
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from pathlib import Path
        from asl_tune.files import write_atomically

        class Refused(Exception):
            pass

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an error from write(), as a full disk gives
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_atomically(Path({str(target)!r}), lambda tmp: tmp.write_bytes(b"x" * 100_000), error=lambda e: Refused(f"cannot write: {{e.strerror}}"))
        except Refused as e:
            print(e, type(e.__cause__).__name__)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout.strip() == "cannot write: File too large OSError"  # the caller's error, raised from the OSError
    assert target.read_bytes() == b"old weights"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]  # the partial temporary was removed


def test_an_error_inside_write_is_raised_as_it_is_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "trials.parquet"
    target.write_text("old")

    def half_then_fail(tmp):
        tmp.write_text("half a fi")
        raise ValueError("encoder broke")

    with pytest.raises(ValueError, match="encoder broke"):  # not an OSError: never turned into the caller's error
        write_atomically(target, half_then_fail, error=lambda e: AssertionError("must not be called"))
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]


def test_a_folder_is_published_whole_and_one_in_the_way_is_kept(tmp_path):
    def fill(tmp):
        (tmp / "a").mkdir(parents=True)
        (tmp / "a" / "x.txt").write_text("mine")

    target = tmp_path / "dataset"
    write_atomically(target, fill)
    assert (target / "a" / "x.txt").read_text() == "mine"

    theirs = tmp_path / "taken"
    theirs.mkdir()
    (theirs / "y.txt").write_text("theirs")
    with pytest.raises(FileExistsError):  # another process made it first: the caller decides
        write_atomically(theirs, fill)
    assert [p.name for p in theirs.iterdir()] == ["y.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dataset", "taken"]


def test_a_leftover_temporary_of_this_process_id_is_cleared_first(tmp_path):
    """A killed writer that had this pid left its half-made folder behind: it must not leak into the new one."""
    stale = tmp_path / f".dataset.tmp{os.getpid()}"
    (stale / "junk").mkdir(parents=True)
    write_atomically(tmp_path / "dataset", lambda tmp: (tmp / "good").mkdir(parents=True))
    assert [p.name for p in (tmp_path / "dataset").iterdir()] == ["good"]
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_on_a_pyarrow_filesystem_the_copy_is_moved_into_place_or_removed(tmp_path):
    fs = pyarrow.fs.LocalFileSystem()
    target = tmp_path / "study.db"
    target.write_bytes(b"old")

    def put(data: bytes):
        def write(tmp: str) -> None:
            with fs.open_output_stream(tmp) as out:
                out.write(data)
                if data == b"broken":
                    raise OSError("connection reset")

        return write

    with pytest.raises(OSError, match="connection reset"):
        write_atomically(str(target), put(b"broken"), fs=fs)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["study.db"]
    write_atomically(str(target), put(b"new"), fs=fs)
    assert target.read_bytes() == b"new" and [p.name for p in tmp_path.iterdir()] == ["study.db"]
