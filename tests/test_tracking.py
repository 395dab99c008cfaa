"""--tensorboard and --mlflow: a real sweep's trials, read back from the event files it wrote and from an MLflow file store."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from sweeps import read, run_cli, write_space

from asl_tune.sweep.tracking import FINAL, SWEEP_TAG, TENSORBOARD_DIR, TRIAL_ID_TAG, MlflowTrials

mlflow = pytest.importorskip("mlflow", reason="MLflow is not installed: pip install 'asl-tune[mlflow]' (the test extra has it)")
from mlflow.tracking import MlflowClient  # noqa: E402

pytestmark = pytest.mark.timeout(600)
# MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE=true says it is wanted; a user who logs to one sets the same.


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar in a TensorBoard run folder's event files: tag -> step -> value (TFRecord framing, Event protos)."""
    from tensorboardX.proto.event_pb2 import Event

    scalars: dict[str, dict[int, float]] = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event file in {folder}"
    for path in files:
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at : at + 8])
            event = Event.FromString(data[at + 12 : at + 12 + length])  # after the length and its CRC
            at += 12 + length + 4  # and the record's CRC
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    scalars.setdefault(value.tag, {})[event.step] = value.simple_value
    return scalars


def test_a_sweep_logs_each_trial_to_tensorboard_and_mlflow(tiny_dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for the sweep and for this test's own reads
    space = write_space(
        tmp_path / "tracked.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 2},
        early_stopping=False,
    )
    uri = (tmp_path / "mlruns").as_uri()
    run_cli(
        [
            "sweep",
            "--space",
            str(space),
            "--data",
            str(tiny_dataset),
            "--results",
            str(tmp_path / "results"),
            "--tensorboard",
            "--mlflow",
            uri,
        ],
        tmp_path,
        400,
    )
    folder = tmp_path / "results" / "tracked"
    trials, epochs = read(folder, "trials"), read(folder, "epochs")
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("tracked").experiment_id])
    assert sorted(r.data.tags[TRIAL_ID_TAG] for r in runs) == sorted(trials["trial_id"])
    for trial in trials.to_dict("records"):
        mine = epochs[epochs["trial_id"] == trial["trial_id"]].set_index("epoch")
        # TensorBoard: the epoch curves at step = epoch, the final metrics under final/ (event files keep float32).
        scalars = tensorboard_scalars(folder / TENSORBOARD_DIR / trial["trial_id"])
        assert scalars["val_accuracy"] == pytest.approx(mine["val_accuracy"].to_dict(), rel=1e-6)
        assert scalars["train_loss"] == pytest.approx(mine["train_loss"].to_dict(), rel=1e-6)
        assert scalars[FINAL + "test_accuracy"] == {2: pytest.approx(trial["test_accuracy"], rel=1e-6)}
        # MLflow: one run per trial, FINISHED, its settings as params, the same curves and final metrics.
        run = next(r for r in runs if r.data.tags[TRIAL_ID_TAG] == trial["trial_id"])
        assert run.info.status == "FINISHED" and run.info.run_name == trial["trial_id"] and run.data.tags[SWEEP_TAG] == "tracked"
        assert run.data.params["head_width"] == str(trial["params_head_width"]) and run.data.params["epochs"] == "2"
        history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "val_accuracy")}
        assert history == pytest.approx(mine["val_accuracy"].to_dict())
        assert run.data.metrics[FINAL + "test_accuracy"] == pytest.approx(trial["test_accuracy"])
        assert run.data.metrics[FINAL + "flops_per_image"] == trial["flops_per_image"]


def test_a_restored_mlflow_callback_logs_a_resumed_trial_to_the_run_it_had(tmp_path, monkeypatch):
    """Tune pickles callbacks with the experiment; the copy a resumed driver unpickles finds the trial's run by its tag."""
    import pickle

    from asl_tune.sweep.recorder import DropRecordedParts
    from asl_tune.sweep.space import load_space, resolve

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    space = load_space(resolve("cpu-quick"))
    trial = SimpleNamespace(trial_id="abc_00000", config={}, last_result=None)  # the fields of a Tune Trial the callback reads
    first = MlflowTrials(uri, "resumed", space)
    first.on_trial_start(0, [], trial)
    first.on_trial_result(0, [], trial, {"epoch_row": {"epoch": 1, "val_accuracy": 0.25}})
    restored = pickle.loads(pickle.dumps(first))
    restored.on_trial_start(0, [], trial)
    last = {
        "val_accuracy": 0.5,
        "epochs_completed": 2,
        "status": "completed",
        "test_accuracy": 0.375,
        "training_iteration": 2,
        "epoch_row": {"epoch": 2, "val_accuracy": 0.5},
    }
    restored.on_trial_result(0, [], trial, last)
    DropRecordedParts(space).on_trial_result(0, [], trial, last)  # what Tune keeps as the trial's last result: no test_accuracy
    trial.last_result = last
    assert "test_accuracy" not in trial.last_result
    restored.on_trial_complete(0, [], trial)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("resumed").experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, "val_accuracy")} == {1: 0.25, 2: 0.5}
    # The final figures are the last result's as the tracker saw it, not what Tune kept of it.
    assert runs[0].data.metrics == {
        "val_accuracy": 0.5,
        FINAL + "val_accuracy": 0.5,
        FINAL + "epochs_completed": 2.0,
        FINAL + "test_accuracy": 0.375,
    }


def test_an_mlflow_uri_that_cannot_be_used_is_refused_in_one_line_before_anything_is_made(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    uri = (tmp_path / "mlruns").as_uri()  # MLflow 3 refuses a file store unless MLFLOW_ALLOW_FILE_STORE is set
    done = subprocess.run(
        [sys.executable, "-m", "asl_tune", "sweep", "--results", str(tmp_path / "results"), "--mlflow", uri],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"asl-tune: error: --mlflow: cannot log to the MLflow tracking URI {uri!r}: "), lines
    assert "MLFLOW_ALLOW_FILE_STORE" in lines[0] and not (tmp_path / "results").exists()


def test_a_trial_mlflow_cannot_log_is_told_once_and_the_sweep_goes_on(tmp_path, monkeypatch, capsys):
    """MLflow holds a copy of the Parquet files' contents: its failure (here the trial's run deleted from the store
    mid-trial) is one line, once per trial, never an exception in Tune's loop."""
    import shutil

    from asl_tune.sweep.space import load_space, resolve

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    callback = MlflowTrials(uri, "lost", load_space(resolve("cpu-quick")))
    trial = SimpleNamespace(trial_id="abc_00001", config={}, last_result={"val_accuracy": 0.5, "epochs_completed": 1})
    callback.on_trial_start(0, [], trial)
    run = MlflowClient(uri).get_run(callback._runs[trial.trial_id])
    shutil.rmtree(tmp_path / "mlruns" / run.info.experiment_id / run.info.run_id)
    callback.on_trial_result(0, [], trial, {"epoch_row": {"epoch": 1, "val_accuracy": 0.5}})
    callback.on_trial_complete(0, [], trial)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("--mlflow:")]
    assert len(lines) == 1 and lines[0].startswith(f"--mlflow: trial abc_00001 is not fully logged to {uri} ("), lines
    assert lines[0].endswith("the Parquet files have it all, and the sweep goes on")
