"""The sweep's folder as one object, local or at a URI (file:// stands in for s3://, gs://): the same methods,
a URI copied both ways, and, unpickled under another cache folder (another machine), that machine's working copy."""

from __future__ import annotations

import os
import pickle
import sqlite3
from pathlib import Path

import optuna
import pandas as pd
import pytest
from sweeps import write_space

from asl_tune.errors import AslTuneError
from asl_tune.results import ResultsStore, read_trials, trial_row, write_atomic
from asl_tune.sweep import mirror
from asl_tune.sweep.mirror import ANALYZE_DIR, MirroredSweepFolder, SweepFolder, sweep_folder
from asl_tune.sweep.recorder import ParquetRecorder
from asl_tune.sweep.request import place
from asl_tune.sweep.space import load_space
from asl_tune.sweep.study import flush_study, study_storage


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def test_a_folder_is_the_record_so_pull_and_sync_copy_nothing(tmp_path):
    sweep = place(tmp_path / "results", "s")
    assert type(sweep) is SweepFolder and sweep.path == tmp_path / "results" / "s"
    sweep.path.mkdir(parents=True)
    (sweep.path / "sweep.json").write_text("{}")
    sweep.pull()
    sweep.sync(final=True)
    assert files_in(sweep.path) == {"sweep.json": b"{}"}
    assert not (Path(os.environ["ASL_TUNE_CACHE"]) / "sweeps").exists()  # no working copy anywhere
    assert sweep.location == sweep.described == str(tmp_path / "results" / "s")
    assert sweep.ray_storage is None
    assert sweep.results_flag == f" --results {tmp_path / 'results'}" and place(Path("results"), "s").results_flag == ""
    with sweep.peek(("sweep.json",)) as (where, shown):
        assert where == sweep.path and shown == sweep.location  # read where it is


def test_a_uri_is_copied_up_as_files_change_and_down_whole(tmp_path, monkeypatch):
    uri = (tmp_path / "bucket").as_uri()
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-a"))
    sweep = place(uri, "s")
    assert isinstance(sweep, MirroredSweepFolder) and sweep.path.is_relative_to(tmp_path / "cache-a")
    remote = tmp_path / "bucket" / "s"
    sweep.path.mkdir(parents=True)
    (sweep.path / "sweep.json").write_text("{}")
    (sweep.path / "notes.txt").write_text("not mirrored")
    with sqlite3.connect(sweep.path / "study.db") as db:  # a sweep made before study.log
        db.execute("create table t (x)")
    (sweep.path / "study.log").write_text('{"op_code":0}\n')
    sweep.sync(final=True)
    assert set(files_in(remote)) == {"sweep.json", "study.db", "study.log"}  # only the mirrored files, and no temporary
    (sweep.path / "sweep.json").write_text('{"runs": []}')
    sweep.sync()
    assert (remote / "sweep.json").read_text() == '{"runs": []}'
    with sqlite3.connect(remote / "study.db") as db:  # a consistent copy of the study
        assert db.execute("select name from sqlite_master").fetchall() == [("t",)]

    # The same sweep on another machine: an empty cache, a stale file there that the URI no longer has.
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-b"))
    moved = pickle.loads(pickle.dumps(sweep))
    assert moved.path.is_relative_to(tmp_path / "cache-b") and moved.location == f"{uri}/s"
    moved.path.mkdir(parents=True)
    (moved.path / "trials.parquet").write_bytes(b"stale")
    moved.pull()
    assert files_in(moved.path) == files_in(remote)
    assert moved.described == f"{uri}/s (working copy {moved.path})"
    assert (
        moved.results_lines()[-1] == f"(working copy: {moved.path})" and f"asl-tune analyze s --results {uri}" in moved.results_lines()[0]
    )
    assert moved.ray_storage == uri


def test_reading_before_the_lock_writes_nothing_to_the_working_copy(tmp_path):
    uri = (tmp_path / "bucket").as_uri()
    (tmp_path / "bucket" / "s").mkdir(parents=True)
    (tmp_path / "bucket" / "s" / "sweep.json").write_text("{}")
    sweep = place(uri, "s")
    with sweep.peek(("sweep.json", "space.yaml")) as (where, shown):
        assert files_in(where) == {"sweep.json": b"{}"} and shown == f"{uri}/s"
    assert not sweep.path.exists()


def test_analyze_copies_into_its_own_folder_and_refuses_a_sweep_that_is_not_there(tmp_path):
    uri = (tmp_path / "bucket").as_uri()
    (tmp_path / "bucket" / "s").mkdir(parents=True)
    (tmp_path / "bucket" / "s" / "trials.parquet").write_bytes(b"rows")
    copies = sweep_folder(uri, "s", ("trials.parquet",), for_analysis=True)
    copies.check_present()
    copies.pull()
    assert copies.path == place(uri, "s").path.parent / ANALYZE_DIR / "s"  # beside a running sweep's working copy, never in it
    assert files_in(copies.path) == {"trials.parquet": b"rows"}
    with pytest.raises(AslTuneError, match=r"/bucket/gone: no such sweep folder \(none of trials.parquet there\)"):
        sweep_folder(uri, "gone", ("trials.parquet",), for_analysis=True).check_present()


def test_the_study_and_the_recorder_find_this_machines_working_copy_when_unpickled(tmp_path, monkeypatch):
    """What `asl-tune resume` on another machine relies on: Tune unpickles both from its experiment state."""
    uri = (tmp_path / "bucket").as_uri()
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-a"))
    sweep = place(uri, "s")
    sweep.path.mkdir(parents=True)
    storage = study_storage(sweep)
    optuna.create_study(study_name="s", storage=storage)
    recorder = ParquetRecorder(
        sweep, load_space(write_space(tmp_path / "s.yaml", 1, params={"lr": {"type": "float", "low": 0.01, "high": 0.1}})), 1
    )
    saved = pickle.dumps((storage, recorder))

    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-b"))
    moved = place(uri, "s")
    moved.path.mkdir(parents=True)
    storage_b, recorder_b = pickle.loads(saved)
    assert storage_b._backend.path == moved.path / "study.log"
    assert not (moved.path / "study.log").exists()  # cache-a's study was not carried along in the pickle
    optuna.create_study(study_name="s", storage=storage_b)  # writes cache-b's study.log, not cache-a's
    flush_study(storage_b)
    assert (moved.path / "study.log").is_file() and (sweep.path / "study.log").is_file()  # cache-a's, written when pickled
    assert recorder_b.folder == moved.path and recorder_b.sweep.location == f"{uri}/s"


def test_a_local_sweep_folder_pickles_as_the_folder_it_names(tmp_path):
    sweep = place(tmp_path / "results", "s")
    again = pickle.loads(pickle.dumps(ParquetRecorder(sweep, None, 1)))
    assert again.folder == tmp_path / "results" / "s" and again.sweep.results_flag == sweep.results_flag


def test_a_flush_copies_up_only_the_parts_it_wrote_and_removes_a_dropped_trials(tmp_path, monkeypatch):
    """The URI gets what each flush names (a sweep of 10,000 trials is never looked through whole), old one-file tables included."""
    uri = (tmp_path / "bucket").as_uri()
    remote = tmp_path / "bucket" / "s"
    remote.mkdir(parents=True)
    write_atomic(
        pd.DataFrame([trial_row("old", "completed", {"lr": 0.1}, {"val_accuracy": 0.9})]), remote / "trials.parquet"
    )  # before parts
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-a"))
    sweep = place(uri, "s")
    sweep.pull()
    store = ResultsStore(sweep.path)
    for tid in ("a", "b"):
        store.put_trial(trial_row(tid, "running", {"lr": 0.1}, {}))
    sweep.sync(changed=store.flush())
    assert sorted(p.name for p in (remote / "trials.parquet").iterdir()) == [
        "schema.parquet",
        "trial-a.parquet",
        "trial-b.parquet",
        "trial-old.parquet",
    ]
    store.drop_trial("a")
    changed = store.flush()
    assert changed == ["trials.parquet/trial-a.parquet"]
    sweep.sync(changed=changed)
    assert list(pd.read_parquet(f"{uri}/s/trials.parquet")["trial_id"]) == ["b", "old"]

    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache-b"))  # another machine's working copy, folder by folder
    moved = pickle.loads(pickle.dumps(sweep))
    moved.pull()
    assert list(read_trials(moved.path)["trial_id"]) == ["b", "old"]


def test_a_file_that_grows_is_copied_again_only_after_twenty_times_its_last_copy_and_always_at_the_end(tmp_path, monkeypatch):
    """study.log grows with the sweep and is copied whole: a copy that took 1 s (a clock the test moves) is not
    followed by another for 20 s (COPY_SHARE), however often it changes; the final sync copies it regardless."""
    clock = [100.0]
    monkeypatch.setattr(mirror.time, "monotonic", lambda: clock[0])
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "cache"))
    sweep = place((tmp_path / "bucket").as_uri(), "s")
    sweep.path.mkdir(parents=True)
    upload, copies = sweep._upload, []

    def slow_upload(src, name):
        upload(src, name)
        copies.append((name, src.read_text()))
        clock[0] += 1.0  # the copy took a second

    monkeypatch.setattr(sweep, "_upload", slow_upload)
    study = sweep.path / "study.log"
    remote = tmp_path / "bucket" / "s" / "study.log"
    for k in range(1, 7):  # syncs at 100 s (the copy ends at 101 s), 105, 109, 113, 117 and 121 s
        study.write_text("line\n" * k)
        sweep.sync(changed=())
        clock[0] += 4.0
    assert copies == [("study.log", "line\n"), ("study.log", "line\n" * 6)]  # at 100 s and at 121 s, not in between
    study.write_text("line\n" * 7)
    sweep.sync(changed=())
    assert remote.read_text() == "line\n" * 6  # within 20 s of the last copy
    sweep.sync(final=True)
    assert remote.read_text() == "line\n" * 7 and len(copies) == 3
