import errno

import pandas as pd
import pyarrow.parquet as pq
import pytest

from asl_tune import results
from asl_tune.errors import AslTuneError
from asl_tune.results import (
    RESULT_FILES,
    ResultsStore,
    compact,
    read_confusion,
    read_epochs,
    read_per_class,
    read_trials,
    trial_row,
    write_atomic,
)


def test_rows_are_keyed_so_repeats_replace_not_duplicate(tmp_path):
    store = ResultsStore(tmp_path)
    store.put_trial(trial_row("t1", "running", {"lr": 0.1}, {"val_accuracy": 0.5}))
    for epoch in (1, 2, 2):  # epoch 2 arrives twice, as after a resume
        store.put_epoch("t1", {"epoch": epoch, "val_accuracy": 0.1 * epoch})
    store.put_trial(trial_row("t1", "completed", {"lr": 0.1}, {"val_accuracy": 0.9, "pair_U_as_R": 0.05}))
    store.flush()
    trials, epochs = read_trials(tmp_path), read_epochs(tmp_path)
    assert list(trials["trial_id"]) == ["t1"] and trials.loc[0, "status"] == "completed"
    assert trials.loc[0, "params_lr"] == 0.1 and trials.loc[0, "pair_U_as_R"] == 0.05
    assert list(epochs["epoch"]) == [1, 2]
    # A new store over the same folder (a resumed driver) starts from what is on disk.
    again = ResultsStore(tmp_path)
    again.put_epoch("t1", {"epoch": 3, "val_accuracy": 0.3})
    again.flush()
    assert list(read_epochs(tmp_path)["epoch"]) == [1, 2, 3]


def test_confusion_is_stored_long_with_class_names(tmp_path):
    store = ResultsStore(tmp_path)
    store.put_confusion("t1", ["R", "U"], [[9, 1], [0, 10]])
    store.flush()
    df = pd.read_parquet(tmp_path / "confusion.parquet")
    assert df.to_dict("records") == [
        {"trial_id": "t1", "true_label": "R", "pred_label": "R", "count": 9},
        {"trial_id": "t1", "true_label": "R", "pred_label": "U", "count": 1},
        {"trial_id": "t1", "true_label": "U", "pred_label": "U", "count": 10},
    ]


def test_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "trials.parquet"
    write_atomic(pd.DataFrame({"trial_id": ["old"]}), path)

    def disk_full(self, *a, **k):
        with open(a[0], "wb") as f:
            f.write(b"PAR1 half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", disk_full)
    with pytest.raises(AslTuneError, match="cannot write .*trials.parquet: the disk is full; the previous file is left intact"):
        write_atomic(pd.DataFrame({"trial_id": ["new"]}), path)
    monkeypatch.undo()
    assert list(pd.read_parquet(path)["trial_id"]) == ["old"]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]  # no temporary left behind


def _one_result(store: ResultsStore, trial_id: str, epoch: int) -> tuple[int, int]:
    """Record one epoch's result as the recorder does (its epoch row, its trial row, a flush); the rows and bytes the flush wrote."""
    store.put_epoch(trial_id, {"epoch": epoch, "val_accuracy": 0.5, "images_seen": 10 * epoch})
    store.put_trial(trial_row(trial_id, "running", {"lr": 0.01}, {"val_accuracy": 0.5, "images_seen": 10 * epoch}))
    written = [store.folder / p for p in store.flush()]
    return sum(pq.read_metadata(p).num_rows for p in written), sum(p.stat().st_size for p in written)


def test_what_a_result_writes_does_not_grow_with_the_results_before_it(tmp_path):
    """A count, not a timing: a result writes its own trial's rows (epochs so far + one trial row), in the same bytes after 1 trial or 100."""
    store = ResultsStore(tmp_path)
    _one_result(store, "t0000", 1)  # the first result also writes each table's schema part
    early = [_one_result(store, "t0001", epoch) for epoch in (1, 2, 3)]
    for k in range(2, 100):
        for epoch in (1, 2, 3):
            _one_result(store, f"t{k:04d}", epoch)
    late = [_one_result(store, "t0100", epoch) for epoch in (1, 2, 3)]
    assert [rows for rows, _ in early] == [2, 3, 4]  # epoch e: e epoch rows and the trial's row
    assert late == early
    assert len(read_epochs(tmp_path)) == 1 + 100 * 3 and read_trials(tmp_path)["trial_id"].is_unique


def _ended_trial(store: ResultsStore, trial_id: str, epochs: int = 3) -> None:
    """A trial through the store as the recorder takes it: its epochs, its test evaluation, its end (a flush), released."""
    for epoch in range(1, epochs + 1):
        _one_result(store, trial_id, epoch)
    store.put_confusion(trial_id, ["R", "U"], [[9, 1], [0, 10]])
    store.put_per_class(trial_id, [{"class_name": "R", "recall": 0.9}, {"class_name": "U", "recall": 1.0}])
    store.put_trial(trial_row(trial_id, "completed", {"lr": 0.01}, {"val_accuracy": 0.5}))
    store.flush()
    store.release_trial(trial_id)


def test_what_the_store_holds_does_not_grow_with_ended_trials_and_their_rows_come_back_when_one_reports_again(tmp_path):
    """A count, not a memory figure: an ended trial keeps its row in memory, its other rows only on disk."""
    store = ResultsStore(tmp_path)
    store.put_trial(trial_row("live", "running", {"lr": 0.01}, {}))
    store.put_epoch("live", {"epoch": 1, "val_accuracy": 0.5})
    for k in range(50):
        _ended_trial(store, f"t{k:03d}")
    assert store.rows_in_memory() == {"trials.parquet": 51, "epochs.parquet": 1, "confusion.parquet": 0, "per_class.parquet": 0}
    # A resume re-runs an ended trial from its checkpoint: its part is rewritten with the epochs before, read back.
    store.put_epoch("t007", {"epoch": 3, "val_accuracy": 0.75})
    store.flush()
    epochs = read_epochs(tmp_path)
    assert list(epochs.loc[epochs.trial_id == "t007", "val_accuracy"]) == [0.5, 0.5, 0.75] and len(epochs) == 50 * 3 + 1
    # A store opened on the folder (a resumed driver) reads the trials' rows, not the rest; dropping a trial it never read removes its parts.
    again = ResultsStore(tmp_path)
    assert again.rows_in_memory() == {"trials.parquet": 51, "epochs.parquet": 0, "confusion.parquet": 0, "per_class.parquet": 0}
    again.drop_trial("t003")
    again.put_epoch("live", {"epoch": 2, "val_accuracy": 0.6})
    again.flush()
    assert "t003" not in set(read_trials(tmp_path)["trial_id"]) | set(read_epochs(tmp_path)["trial_id"]) | set(
        read_confusion(tmp_path)["trial_id"]
    )
    assert not list(tmp_path.glob("*/trial-t003.parquet"))
    assert list(read_epochs(tmp_path).query("trial_id == 'live'")["epoch"]) == [1, 2]
    assert (
        len(pd.read_parquet(tmp_path / "per_class.parquet")) == 49 * 2
        and pd.read_parquet(tmp_path / "confusion.parquet")["trial_id"].nunique() == 49
    )


def test_pandas_reads_a_table_folder_in_one_call_with_every_column(tmp_path):
    store = ResultsStore(tmp_path)
    store.put_trial(trial_row("a", "completed", {"lr": 0.1}, {"val_accuracy": 1, "images_seen": 5}))  # an int where later rows hold floats
    store.flush()
    store.put_trial(
        {**trial_row("b", "errored", {"lr": 0.2}, {"val_accuracy": 0.5, "pair_U_as_R": 0.25}), "error": "boom"}
    )  # columns "a" lacks
    store.flush()
    one_call = pd.read_parquet(tmp_path / "trials.parquet")
    assert list(one_call["trial_id"]) == ["a", "b"]
    assert one_call["val_accuracy"].tolist() == [1.0, 0.5] and one_call.loc[1, "pair_U_as_R"] == 0.25 and one_call.loc[1, "error"] == "boom"
    ours = read_trials(tmp_path)
    assert ours[["trial_id", "val_accuracy", "pair_U_as_R", "error"]].equals(one_call[["trial_id", "val_accuracy", "pair_U_as_R", "error"]])


def test_a_sweep_in_the_old_one_file_layout_is_read_and_moved_to_parts_by_its_next_write(tmp_path):
    old = pd.DataFrame([trial_row("t1", "completed", {"lr": 0.1}, {"val_accuracy": 0.9})])
    write_atomic(old, tmp_path / "trials.parquet")
    write_atomic(pd.DataFrame([{"trial_id": "t1", "epoch": 1, "val_accuracy": 0.9}]), tmp_path / "epochs.parquet")
    assert list(read_trials(tmp_path)["trial_id"]) == ["t1"] and list(read_epochs(tmp_path)["epoch"]) == [1]
    store = ResultsStore(tmp_path)
    store.put_epoch("t2", {"epoch": 1, "val_accuracy": 0.5})
    store.put_trial(trial_row("t2", "running", {"lr": 0.2}, {}))
    store.flush()
    assert (tmp_path / "trials.parquet").is_dir() and (tmp_path / "epochs.parquet").is_dir()
    assert list(read_trials(tmp_path)["trial_id"]) == ["t1", "t2"] and read_trials(tmp_path).loc[0, "val_accuracy"] == 0.9
    assert read_epochs(tmp_path)[["trial_id", "epoch"]].values.tolist() == [["t1", 1], ["t2", 1]]


# Compaction (results.compact): the ended trials' parts become one sealed part per table, swapped in at once.

READERS = {
    "trials.parquet": read_trials,
    "epochs.parquet": read_epochs,
    "confusion.parquet": read_confusion,
    "per_class.parquet": read_per_class,
}
KEYS = {
    "trials.parquet": ["trial_id"],
    "epochs.parquet": ["trial_id", "epoch"],
    "confusion.parquet": ["trial_id", "true_label", "pred_label"],
    "per_class.parquet": ["trial_id", "class_name"],
}


def _a_sweep(folder) -> None:
    """12 trials as a sweep's recorder leaves them: 9 completed, one diverged, one errored, one running."""
    store = ResultsStore(folder)
    for k in range(10):
        _ended_trial(store, f"t{k:03d}")
    store.put_trial(trial_row("t009", "diverged", {"lr": 0.01}, {"val_accuracy": 0.1}))
    store.put_trial({**trial_row("t010", "errored", {"lr": 0.02}, {}), "error": "boom"})
    store.put_epoch("t010", {"epoch": 1, "val_accuracy": 0.2})
    store.put_trial(trial_row("t011", "running", {"lr": 0.03}, {"pair_K_as_V": 0.5}))  # a column the ended trials lack
    store.put_epoch("t011", {"epoch": 1, "val_accuracy": 0.3})
    store.flush()


def _tables(folder) -> dict[str, pd.DataFrame]:
    """Every table read both ways: asl-tune's readers, and pandas on the table's folder in one call (rows sorted by key)."""
    out = {}
    for name, read in READERS.items():
        out[name] = read(folder)
        one_call = pd.read_parquet(folder / name)
        out[f"pandas {name}"] = one_call.sort_values(KEYS[name]).reset_index(drop=True)[sorted(one_call.columns)]
    return out


def _assert_same(got: dict, expected: dict) -> None:
    for key, frame in expected.items():
        pd.testing.assert_frame_equal(got[key].reset_index(drop=True), frame.reset_index(drop=True), check_dtype=False, obj=key)


def test_compaction_keeps_every_row_once_and_seals_only_trials_that_ended_for_good(tmp_path):
    _a_sweep(tmp_path)
    before = _tables(tmp_path)
    assert len(before["epochs.parquet"]) == 10 * 3 + 2 and len(before["confusion.parquet"]) == 10 * 3
    changed = compact(tmp_path)
    assert sorted(p.name for p in (tmp_path / "trials.parquet").iterdir()) == [
        "schema.parquet",
        "sealed-000001.parquet",
        "trial-t010.parquet",
        "trial-t011.parquet",
    ]
    assert sorted(p.name for p in (tmp_path / "confusion.parquet").iterdir()) == ["schema.parquet", "sealed-000001.parquet"]
    assert (
        changed[0] == "trials.parquet/sealed-000001.parquet" and "trials.parquet/trial-t000.parquet" in changed
    )  # new first, then removed
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # the old folders are gone
    _assert_same(_tables(tmp_path), before)
    assert compact(tmp_path) == []  # nothing more to seal: nothing rewritten


def test_a_reader_beside_a_compaction_never_sees_a_row_twice_nor_misses_one(tmp_path, monkeypatch):
    """Each interleaving forced: readers at the moment the new folder is written beside the old one, just after the swap
    (the old folder not yet removed), and a reader that listed the parts before the swap and opens them after."""
    _a_sweep(tmp_path)
    expected = _tables(tmp_path)
    swap, seen = results._exchange, []
    listed = {name: pq.ParquetDataset(tmp_path / name) for name in RESULT_FILES}  # pyarrow's dataset: listed now, read later

    def swap_with_readers(a, b):
        seen.append(_tables(tmp_path))  # the compacted folder written, the old parts still in place
        swap(a, b)
        seen.append(_tables(tmp_path))  # swapped in, the old folder not yet removed

    monkeypatch.setattr(results, "_exchange", swap_with_readers)
    compact(tmp_path)
    assert len(seen) == 2 * 4
    for tables in seen:
        _assert_same(tables, expected)
    for name, dataset in listed.items():  # its parts are gone from the folder it listed: it fails, it never reads a wrong set
        with pytest.raises(FileNotFoundError):
            dataset.read()


@pytest.mark.parametrize("at", [0, 3, -1])
def test_asl_tunes_reader_cut_by_a_compaction_reads_the_folder_again(tmp_path, monkeypatch, at):
    """The compaction runs whole between two part reads of read_table (after the first, one in the middle, the last)."""
    _a_sweep(tmp_path)
    expected = {name: read(tmp_path) for name, read in READERS.items()}
    read_part, cut = results._read_part, {}

    def part_then_compaction(path):
        table = read_part(path)
        if cut.get("busy") or path.parent.name != "epochs.parquet":
            return table
        cut["reads"] = cut.get("reads", 0) + 1
        parts = len([p for p in path.parent.iterdir() if p.suffix == ".parquet"])
        if "done" not in cut and cut["reads"] == (at % parts) + 1:
            cut["busy"] = True
            compact(tmp_path)
            cut.update(busy=False, done=True)
        return table

    monkeypatch.setattr(results, "_read_part", part_then_compaction)
    got = read_epochs(tmp_path)
    assert cut.get("done") and (tmp_path / "epochs.parquet" / "sealed-000001.parquet").exists()
    pd.testing.assert_frame_equal(got, expected["epochs.parquet"], check_dtype=False)


def test_a_reading_cut_by_a_flush_that_adds_a_sealed_part_stands_as_of_its_listing(tmp_path, monkeypatch):
    """A running sweep's flush adds a sealed part of trials that had no part (ResultsStore.end_trial): a reader that
    listed the folder before it keeps what it read, not a row twice nor a torn trial, and does not read again
    (a sweep flushes every second: reading again for each would never end on a large folder)."""
    store = ResultsStore(tmp_path)
    for k in range(4):
        _ended_trial(store, f"t{k:03d}")
    expected = read_epochs(tmp_path)
    read_part, reads = results._read_part, []

    def part_then_flush(path):
        reads.append(path.name)
        if len(reads) == 2:  # between two part reads: two short trials end and are flushed together
            for tid in ("u000", "u001"):
                for epoch in (1, 2):
                    store.put_epoch(tid, {"epoch": epoch, "val_accuracy": 0.5})
                store.put_trial(trial_row(tid, "completed", {"lr": 0.01}, {"val_accuracy": 0.5}))
                store.end_trial(tid, for_good=True)
            assert "epochs.parquet/sealed-000001.parquet" in store.flush()
        return read_part(path)

    monkeypatch.setattr(results, "_read_part", part_then_flush)
    pd.testing.assert_frame_equal(read_epochs(tmp_path), expected, check_dtype=False)
    assert len(reads) == 1 + 4  # the schema part and the 4 trials' parts, once: not read again
    monkeypatch.setattr(results, "_read_part", read_part)
    now = read_epochs(tmp_path)
    assert len(now) == 4 * 3 + 2 * 2 and set(now.trial_id) == {"t000", "t001", "t002", "t003", "u000", "u001"}
    assert len(pd.read_parquet(tmp_path / "epochs.parquet")) == len(now)


def test_a_sealed_trial_that_reports_again_or_is_dropped_leaves_its_sealed_part(tmp_path):
    _a_sweep(tmp_path)
    compact(tmp_path)
    store = ResultsStore(tmp_path)  # a resumed driver
    assert store.rows_in_memory()["epochs.parquet"] == 0
    store.put_epoch("t004", {"epoch": 4, "val_accuracy": 0.8})  # Tune re-runs it from its checkpoint
    store.put_trial(trial_row("t004", "running", {"lr": 0.01}, {"val_accuracy": 0.8}))
    store.drop_trial("t005")
    changed = store.flush()
    assert "epochs.parquet/sealed-000002.parquet" in changed and "epochs.parquet/trial-t004.parquet" in changed
    epochs, trials = read_epochs(tmp_path), read_trials(tmp_path)
    assert list(epochs.loc[epochs.trial_id == "t004", "epoch"]) == [1, 2, 3, 4] and len(epochs) == 10 * 3 + 2 + 1 - 3
    assert trials.loc[trials.trial_id == "t004", "status"].item() == "running" and "t005" not in set(trials.trial_id)
    assert "t005" not in set(pd.read_parquet(tmp_path / "confusion.parquet").trial_id)
    assert len(pd.read_parquet(tmp_path / "epochs.parquet")) == len(epochs)  # pandas too: t004's rows once
    store.put_trial(trial_row("t004", "completed", {"lr": 0.01}, {"val_accuracy": 0.8}))
    store.flush()
    compact(tmp_path)  # sealed again, with its new epoch
    assert sorted(p.name for p in (tmp_path / "epochs.parquet").iterdir()) == [
        "schema.parquet",
        "sealed-000003.parquet",
        "trial-t010.parquet",
        "trial-t011.parquet",
    ]
    pd.testing.assert_frame_equal(read_epochs(tmp_path), epochs, check_dtype=False)
