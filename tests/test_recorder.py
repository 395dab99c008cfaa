"""What the driver-side recorder writes, counted (never timed): results are batched, and the files are never behind Tune's saved state."""

from __future__ import annotations

import pytest
from sweeps import write_space

import asl_tune.results as results
import asl_tune.sweep.recorder as recorder_module
from asl_tune.results import read_epochs, read_trials
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
    recorder.on_trial_complete(0, [a, b], a)  # a trial's end is written at once
    assert parts_written[4:] == ["epochs.parquet/trial-a.parquet", "trials.parquet/trial-a.parquet"]
    assert read_trials(recorder.folder).set_index("trial_id").loc["a", "status"] == "completed"
