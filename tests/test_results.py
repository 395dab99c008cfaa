import errno

import pandas as pd
import pytest

from asl_tune.errors import AslTuneError
from asl_tune.results import ResultsStore, read_epochs, read_trials, trial_row, write_atomic


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
