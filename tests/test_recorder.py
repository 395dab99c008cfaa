"""What the driver-side recorder writes, counted (never timed): results are batched, and the files are never behind Tune's saved state."""

from __future__ import annotations

import pandas as pd
import pytest
from sweeps import write_space

import asl_tune.results as results
import asl_tune.sweep.recorder as recorder_module
from asl_tune.results import compact, read_epochs, read_trials
from asl_tune.sweep.recorder import ParquetRecorder
from asl_tune.sweep.space import load_space


class FakeTrial:
    """What the recorder reads of a Tune trial."""

    def __init__(self, trial_id: str):
        self.trial_id, self.config, self.last_result = trial_id, {"lr": 0.05}, {}

    def is_finished(self) -> bool:
        return False


def report(epoch: int) -> dict:
    return {
        "val_accuracy": 0.1 * epoch,
        "images_seen": 10 * epoch,
        "epochs_completed": epoch,
        "epoch_row": {"epoch": epoch, "val_accuracy": 0.1 * epoch, "images_seen": 10 * epoch},
    }


@pytest.fixture
def parts_written(monkeypatch):
    """The parts (not schema parts) each write_atomic call wrote, in order."""
    written: list[str] = []
    real = results.write_atomic

    def counted(df, path):
        if path.name != results.SCHEMA_PART:
            written.append(f"{path.parent.name}/{path.name}")
        real(df, path)

    monkeypatch.setattr(results, "write_atomic", counted)
    monkeypatch.setattr(recorder_module, "FLUSH_EVERY_S", 3600.0)  # only Tune's saves and trial ends flush here
    return written


def test_results_are_written_once_per_trial_per_flush_and_all_of_them_when_tune_saves_its_state(tmp_path, parts_written):
    space = load_space(write_space(tmp_path / "s.yaml", 2, params={"lr": {"type": "float", "low": 0.01, "high": 0.1}}, fixed={"epochs": 3}))
    recorder = ParquetRecorder(tmp_path / "sweep", space, 2)
    a, b = FakeTrial("a"), FakeTrial("b")
    for trial in (a, b):
        recorder.on_trial_start(0, [], trial)
    for epoch in (1, 2):
        for trial in (a, b):
            recorder.on_trial_result(0, [], trial, report(epoch))
    assert parts_written == []  # 2 starts and 4 results: nothing written yet, one write per table and trial to come
    assert recorder.get_state() is None  # what Tune calls as it saves its experiment state, before a resume can see it
    assert sorted(parts_written) == [
        "epochs.parquet/trial-a.parquet",
        "epochs.parquet/trial-b.parquet",
        "trials.parquet/trial-a.parquet",
        "trials.parquet/trial-b.parquet",
    ]
    assert len(read_epochs(recorder.folder)) == 4 and set(read_trials(recorder.folder)["status"]) == {"running"}
    recorder.get_state()
    assert len(parts_written) == 4  # nothing new: nothing rewritten
    a.last_result = report(3)
    recorder.on_trial_result(0, [], a, report(3))
    recorder.on_trial_complete(0, [a, b], a)  # a trial's end waits for the flush, as results do
    assert len(parts_written) == 4 and recorder.store.rows_in_memory()["epochs.parquet"] == 5
    recorder.get_state()
    assert parts_written[4:] == ["epochs.parquet/trial-a.parquet", "trials.parquet/trial-a.parquet"]  # it has parts: rewritten
    assert read_trials(recorder.folder).set_index("trial_id").loc["a", "status"] == "completed"
    assert recorder.store.rows_in_memory()["epochs.parquet"] == 2  # a's epochs left memory once written; b's stay


CLASSES = ["R", "U"]


def last_report(epoch: int) -> dict:
    return {
        **report(epoch),
        "confusion": [[9, 1], [0, 10]],
        "per_class": [{"class_name": c, "support": 10, "recall": 0.9} for c in CLASSES],
    }


def run_short_trials(recorder, ids, epochs: int = 3) -> None:
    """Trials that start, report every epoch and end between two flushes (1-s trials at FLUSH_EVERY_S)."""
    for tid in ids:
        trial = FakeTrial(tid)
        recorder.on_trial_start(0, [], trial)
        for epoch in range(1, epochs + 1):
            trial.last_result = last_report(epoch) if epoch == epochs else report(epoch)
            recorder.on_trial_result(0, [], trial, trial.last_result)
        recorder.on_trial_complete(0, [], trial)


def one_call(folder, name: str, keys: list[str]) -> pd.DataFrame:
    """pandas on a table's folder in one call, as results/README.md shows users."""
    return pd.read_parquet(folder / name).sort_values(keys).reset_index(drop=True)


def test_trials_that_start_and_end_between_flushes_are_written_in_one_sealed_part_per_table(tmp_path, parts_written):
    """Issue 29: a part a flush for the short trials that ended, not four parts a trial; each row once, for pandas' one
    call too; their rows leave memory; a resumed driver reads one back from the right part when the trial reports again."""
    space = load_space(write_space(tmp_path / "s.yaml", 8, params={"lr": {"type": "float", "low": 0.01, "high": 0.1}}, fixed={"epochs": 3}))
    recorder = ParquetRecorder(tmp_path / "sweep", space, 8)
    run_short_trials(recorder, ["t0", "t1", "t2"])
    assert parts_written == []
    recorder.get_state()
    tables = ("trials.parquet", "epochs.parquet", "confusion.parquet", "per_class.parquet")
    assert parts_written == [f"{t}/sealed-000001.parquet" for t in tables]
    assert recorder.store.rows_in_memory() == {"trials.parquet": 3, "epochs.parquet": 0, "confusion.parquet": 0, "per_class.parquet": 0}
    run_short_trials(recorder, ["t3", "t4"])
    recorder.on_experiment_end([])
    assert parts_written[4:] == [f"{t}/sealed-000002.parquet" for t in tables]
    folder = recorder.folder
    epochs = read_epochs(folder)
    assert list(zip(epochs.trial_id, epochs.epoch)) == [(f"t{k}", e) for k in range(5) for e in (1, 2, 3)]
    assert list(one_call(folder, "epochs.parquet", ["trial_id", "epoch"]).trial_id) == list(epochs.trial_id)
    assert len(one_call(folder, "confusion.parquet", ["trial_id", "true_label", "pred_label"])) == 5 * 3  # 3 non-zero cells each
    assert set(read_trials(folder).status) == {"completed"} and len(read_trials(folder)) == 5

    store = results.ResultsStore(folder)  # a resumed driver: t1 (in the first sealed part) is run again from a checkpoint
    store.put_epoch("t1", {"epoch": 4, "val_accuracy": 0.9})
    store.flush()
    again = read_epochs(folder)
    assert list(again.loc[again.trial_id == "t1", "epoch"]) == [1, 2, 3, 4] and len(again) == 5 * 3 + 1
    assert len(one_call(folder, "epochs.parquet", ["trial_id", "epoch"])) == len(again)
    compact(folder)  # the run's end: every ended trial in one part per table again
    assert sorted(p.name for p in (folder / "confusion.parquet").iterdir()) == ["schema.parquet", "sealed-000003.parquet"]
    pd.testing.assert_frame_equal(read_epochs(folder), again, check_dtype=False)
