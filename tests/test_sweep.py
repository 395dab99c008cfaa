"""Real Ray Tune sweeps on tiny real JPEG data: end to end, faults inside trials, extend, two nodes, resume after SIGKILL."""

from __future__ import annotations

import contextlib
import io
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import ray
import torch
from conftest import make_dataset
from PIL import Image
from ray.cluster_utils import Cluster
from sweeps import assert_consistent, cli, kill_group, read, run_cli, study_states, wait_for, wait_for_saved_state, write_space

from asl_tune.cli import main
from asl_tune.data import load_dataset, make_splits
from asl_tune.sweep.request import SweepRequest
from asl_tune.sweep.run import run_sweep
from asl_tune.sweep.trainable import FAULT_ENV
from asl_tune.train import device_name, load_trained, pick_device

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """5 classes x 30 frames of 32 px JPEGs: big enough to split and learn, small enough for seconds per epoch."""
    return make_dataset(tmp_path_factory.mktemp("data"), per_class=30, size=32)


@pytest.fixture(scope="module")
def faulty_sweep(tmp_path_factory, data):
    """One sweep with a healthy, a diverging and a crashing trial (fixed points), then extended by one trial."""
    work = tmp_path_factory.mktemp("sweep")
    space = write_space(
        work / "faults.yaml",
        3,
        params={
            "lr": {"type": "float", "low": 0.001, "high": 1000.0, "log": True},
            "head_width": {"type": "categorical", "choices": [16, 24, 32]},
        },
        fixed={"epochs": 2},
        early_stopping=False,
        points=[{"lr": 0.02, "head_width": 32}, {"lr": 1000.0, "head_width": 32}, {"lr": 0.02, "head_width": 24}],
    )
    mp = pytest.MonkeyPatch()
    mp.setenv(FAULT_ENV, "raise@1:head_width=24")  # the third point's trial raises after its first epoch
    with contextlib.redirect_stderr(io.StringIO()) as err:
        rc = main(["sweep", "--space", str(space), "--data", str(data), "--results", str(work / "results"), "--seed", "1"])
    mp.undo()
    folder = work / "results" / "faults"
    # A sweep with an errored trial exits 3 (TrialsErrored), its last line naming the trial and its log; it was
    # retried from the checkpoint of its first epoch, so each retry says it continues from it.
    out = err.getvalue()
    assert rc == 3, out[-3000:]
    errored = read(folder, "trials").query("params_head_width == 24").trial_id.iloc[0]
    assert (
        out.strip()
        .splitlines()[-1]
        .startswith(f"asl-tune: error: sweep 'faults' ended with 1 of 3 trials errored: {errored} (RuntimeError: fault drill")
    ), out[-2000:]
    assert f"log: {folder}/logs/{errored}.log)" in out.strip().splitlines()[-1]
    assert f"trial {errored} continues from its last checkpoint" in out and "no checkpoint yet" not in out
    before = {name: read(folder, name) for name in ("trials", "epochs", "confusion")}
    rc_extend = main(
        ["sweep", "--name", "faults", "--extend", "--num-samples", "1", "--data", str(data), "--results", str(work / "results")]
    )
    return folder, before, rc_extend


def test_sweep_records_completed_diverged_and_errored_trials_and_goes_on(faulty_sweep):
    folder, before, _ = faulty_sweep
    trials = before["trials"]
    assert len(trials) == 3
    healthy = trials[(trials.params_lr.round(3) == 0.02) & (trials.params_head_width == 32)].iloc[0]
    diverging = trials[trials.params_lr > 100].iloc[0]
    errored = trials[trials.params_head_width == 24].iloc[0]
    assert healthy.status == "completed" and 0 <= healthy.test_accuracy <= 1 and healthy.epochs_completed == 2
    assert diverging.status == "diverged"
    assert (
        errored.status == "errored" and errored.error.startswith("RuntimeError: fault drill") and errored.error.endswith("after epoch 2")
    )  # the last try's
    # Its full log: settings, the traceback, and the trial's own output (the trainer's log lines), named in its row.
    assert errored.log == f"logs/{errored.trial_id}.log"
    log = (folder / errored.log).read_text()
    assert "head_width': 24" in log and 'raise RuntimeError(f"fault drill' in log  # the traceback's source lines
    assert "the trial's own output" in log and "epoch 1/2" in log.split("the trial's own output", 1)[1]
    assert healthy.log is None or pd.isna(healthy.log)
    assert (pd.to_datetime(trials["started_at"]) <= pd.to_datetime(trials["ended_at"])).all()  # the driver's clock, each trial's span
    assert healthy.node_id and healthy.hostname and healthy.device == device_name(pick_device())  # a GPU host's trials run on its GPU
    for col in ("pair_U_as_R", "pair_R_as_U", "pair_K_as_V", "pair_V_as_K"):
        assert col not in trials.columns or trials[col].isna().all()  # the tiny data has no U, R, K or V
    # Every setting is recorded, searched or fixed.
    assert {"params_lr", "params_head_width", "params_epochs", "params_image_size", "params_momentum", "params_split"} <= set(
        trials.columns
    )
    assert (trials["params_epochs"] == 2).all() and (trials["params_image_size"] == 32).all()
    epochs = before["epochs"]
    assert list(epochs[epochs.trial_id == healthy.trial_id]["epoch"]) == [1, 2]
    confusion = before["confusion"]
    assert confusion[confusion.trial_id == healthy.trial_id]["count"].sum() == 15  # 5 classes x 3 test frames
    state = json.loads((folder / "sweep.json").read_text())
    assert [r["finished"] for r in state["runs"]] == [True, True]


def test_each_trial_records_its_last_checkpoint_and_it_loads_as_the_trained_network(faulty_sweep, data):
    folder, before, _ = faulty_sweep
    trials = before["trials"]
    has = trials.set_index("status")["checkpoint"].notna().to_dict()
    assert has == {"completed": True, "errored": True, "diverged": False}  # errored: the epoch it finished; diverged: no sound weights
    for checkpoint in trials["checkpoint"].dropna():
        assert Path(checkpoint).is_relative_to(folder / "ray" / "run-1") and (Path(checkpoint) / "checkpoint.pt").is_file()
    healthy = trials[trials.status == "completed"].iloc[0]
    net = load_trained(healthy.checkpoint)
    assert net.config.head_width == healthy.params_head_width and net.config.lr == healthy.params_lr and net.config.epochs == 2
    # The weights are the final ones: on the trial's own validation split they score what the trial reported.
    dataset = load_dataset(data, net.config.image_size)
    val = make_splits(dataset.labels, dataset.frames, net.config.split, net.config.split_seed).val
    predicted = net.classify(dataset.images[val])
    accuracy = np.mean([p == dataset.classes[label] for p, label in zip(predicted, dataset.labels[val])])
    assert accuracy == pytest.approx(healthy.val_accuracy)
    assert net.classes == dataset.classes


def test_extend_adds_trials_that_the_same_study_learns_from(faulty_sweep):
    folder, before, rc = faulty_sweep
    assert rc == 0
    trials = read(folder, "trials")
    assert len(trials) == 4 and set(before["trials"]["trial_id"]) < set(trials["trial_id"])
    n, states = study_states(folder)
    assert n == 4 and "RUNNING" not in states
    assert_consistent(folder, 4)


def test_an_existing_name_is_refused_without_extend(faulty_sweep, capsys):
    folder, _, _ = faulty_sweep
    rc = main(["sweep", "--space", str(folder / "space.yaml"), "--name", "faults", "--results", str(folder.parent)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "already exists" in err[0] and "--extend" in err[0] and "asl-tune resume faults" in err[0]
    assert len(read(folder, "trials")) == 4


def test_trials_run_on_both_nodes_of_a_two_node_cluster(tmp_path, data):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "node_ip_address": "127.0.0.1", "include_dashboard": False})
    cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
    try:
        ray.init(address=cluster.address)
        space = write_space(
            tmp_path / "two.yaml",
            4,
            params={"head_width": {"type": "categorical", "choices": [16, 32]}},
            fixed={"epochs": 2},
            early_stopping=False,
        )
        folder = run_sweep(SweepRequest(space_path=space, data=data, results=tmp_path / "results", address=cluster.address))
    finally:
        ray.shutdown()
        cluster.shutdown()
    trials, _ = assert_consistent(folder, 4)
    assert trials["node_id"].nunique() == 2, trials[["trial_id", "node_id"]]


def test_a_reused_worker_carries_nothing_of_one_trial_into_the_next(tmp_path, data):
    """reuse_actors: one worker runs trial after trial. The same settings a second time, after another trial in that
    same worker, train to the very same losses (seeds, the model, the optimiser, threads start afresh), and no
    trial's scratch folder is left behind."""
    import tempfile

    from asl_tune.sweep.trainable import _work_prefix

    same = {"head_width": 16, "lr": 0.05}
    space = write_space(
        tmp_path / "reuse.yaml",
        3,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}, "lr": {"type": "float", "low": 0.01, "high": 0.1}},
        fixed={"epochs": 2},
        early_stopping=False,
        points=[same, {"head_width": 32, "lr": 0.01}, same],
    )
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1")  # one CPU: the trials run one after another
    try:
        folder = run_sweep(SweepRequest(space_path=space, data=data, results=tmp_path / "results"))
        workers = [a for a in ray._private.state.actors().values() if a["ActorClassName"] == "ImplicitFunc"]  # Tune's trial actors
    finally:
        ray.shutdown()
    assert len(workers) == 1, workers  # the three trials ran in one reused worker process
    assert not list(Path(tempfile.gettempdir()).glob(f"{_work_prefix(workers[0]['Pid'])}*"))
    trials, epochs = assert_consistent(folder, 3)
    trials = trials.sort_values("started_at")
    first, last = trials["trial_id"].iloc[0], trials["trial_id"].iloc[2]
    assert trials["params_head_width"].tolist() == [16, 32, 16]
    columns = ["epoch", "train_loss", "train_accuracy", "val_loss", "val_accuracy"]
    a, b = (epochs[epochs["trial_id"] == t][columns].reset_index(drop=True) for t in (first, last))
    pd.testing.assert_frame_equal(a, b, check_exact=True)


def test_resume_after_sigkill_of_the_driver_continues_interrupted_trials(tmp_path):
    data = make_dataset(tmp_path / "data", per_class=100, size=32)  # about a second per epoch
    space = write_space(
        tmp_path / "killed.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 6},
        early_stopping=False,
    )
    args = ["--results", str(tmp_path / "results")]
    folder = tmp_path / "results" / "killed"
    with cli(["sweep", "--space", str(space), "--data", str(data), "--max-concurrent", "1", *args], cwd=tmp_path) as driver:
        # Kill mid-way through the first trial: two epochs recorded, and Tune's state saved after that.
        wait_for(lambda: (read(folder, "epochs")["epoch"] >= 2).any(), 240, driver, "the first trial's second epoch")
        wait_for_saved_state(folder / "ray" / "run-1", time.time(), proc=driver)
        kill_group(driver)
    trials_then, seen = read(folder, "trials"), read(folder, "epochs")
    running = set(trials_then.loc[trials_then.status == "running", "trial_id"])
    assert running, "the kill came too late: no trial was mid-way"
    interrupted = seen[seen.trial_id.isin(running)].groupby("trial_id")["epoch"].max().idxmax()
    kept = seen[seen.trial_id == interrupted].set_index("epoch")

    out = run_cli(["resume", "killed", *args], tmp_path, 400)
    assert "resuming sweep 'killed'" in out
    trials, epochs = assert_consistent(folder, 2)  # the interrupted trial, and the one that had not begun
    assert set(trials["status"]) == {"completed"}
    mine = epochs[epochs.trial_id == interrupted].set_index("epoch")
    assert list(mine.index) == [1, 2, 3, 4, 5, 6]
    # The interrupted trial went on from its checkpoint: epochs finished before the kill were not trained
    # again (a re-run would record the same loss, as training is deterministic, but a new duration).
    for epoch in kept.index[:-1]:
        assert mine.loc[epoch, "seconds"] == kept.loc[epoch, "seconds"], epoch
    assert (mine.loc[kept.index, "train_loss"] == kept["train_loss"]).all()
    # The recorder Tune restored still records checkpoints: the interrupted trial's row names its final one.
    final = Path(trials.set_index("trial_id").loc[interrupted, "checkpoint"])
    assert torch.load(final / "checkpoint.pt", weights_only=True)["epoch"] + 1 == 6
    best = re.search(r"best val_accuracy \S+ \(trial (\w+)\)", out).group(1)
    assert f"its weights: {trials.set_index('trial_id').loc[best, 'checkpoint']} " in out


def test_tune_keeps_of_each_trial_only_what_it_and_asl_tune_read_the_files_have_the_rest(faulty_sweep):
    """Tune holds every trial's last result for the whole sweep, with statistics of each number, in the driver's
    memory and in each save of its state: it keeps the searched metric, how the trial ended, ASHA's time axis and
    where it ran; the epoch row, the confusion matrix, the per-class rates and the other figures are in the files."""
    from ray.tune import ExperimentAnalysis

    from asl_tune.sweep.recorder import KEPT_FOR_TUNE, NOT_TRIAL_COLUMNS, TUNE_KEYS

    folder, before, _ = faulty_sweep
    tune_trials = ExperimentAnalysis(str(folder / "ray" / "run-1")).trials
    reported = [t for t in tune_trials if t.last_result.get("epochs_completed")]
    assert len(tune_trials) == 3 and len(reported) >= 2  # the healthy and the diverging trial, at least
    kept = set(TUNE_KEYS) | set(KEPT_FOR_TUNE) | {"val_accuracy"}
    for trial in reported:
        assert not set(NOT_TRIAL_COLUMNS) & set(trial.last_result) and set(trial.last_result) <= kept, trial.last_result.keys()
        assert "val_accuracy" in trial.last_result and set(trial.metric_analysis) <= kept
    healthy = before["trials"].loc[before["trials"]["status"] == "completed"]
    assert len(healthy) == 1 and set(healthy["trial_id"]) <= set(before["confusion"]["trial_id"])  # the files have them
    assert healthy[["test_accuracy", "train_img_per_s", "n_parameters"]].notna().all(axis=None)  # and every figure Tune no longer keeps
    assert {t.trial_id for t in reported} <= set(before["epochs"]["trial_id"])


def test_analyze_renders_every_plot_from_a_real_sweep(faulty_sweep, capsys):
    folder, _, _ = faulty_sweep
    assert main(["analyze", "faults", "--results", str(folder.parent)]) == 0
    out = capsys.readouterr().out
    assert "faults:" in out and "most accurate" in out
    report = folder / "report"
    for name in ("pareto.png", "learning_curves.png", "confusion_best.png", "pairs.png", "importance.png"):
        with Image.open(report / name) as img:
            assert img.size[0] >= 300 and img.size[1] >= 200, name
    text = (report / "report.md").read_text()
    assert "pareto.png" in text and "learning_curves.png" in text
    trials = read(folder, "trials")
    best = trials.set_index("trial_id").loc[re.search(r"## Best trial: (\w+)", text).group(1)]
    assert (
        f"- weights: `{Path(best.checkpoint).relative_to(folder.parent).as_posix()}`, relative to the results folder" in text
        and f"best trial's weights: {best.checkpoint}" in out
    )
    front = pd.read_parquet(report / "pareto_front.parquet")
    assert set(front["trial_id"]) <= set(trials.loc[trials.status.isin(["completed", "stopped_early"]), "trial_id"]) and len(front) >= 1


# ---------------------------------------------------------------- results at a URI (file:// stands in for s3://, gs://)


@pytest.fixture(scope="module")
def uri_sweep(tmp_path_factory, data):
    """A 2-trial sweep with --results file://.../bucket and its working copy in cache-a, then extended by
    one trial from an empty cache folder (cache-b), as a second driver machine would."""
    work = tmp_path_factory.mktemp("uri")
    space = write_space(
        work / "remote.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 1},
        early_stopping=False,
    )
    uri = (work / "bucket").as_uri()
    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("ASL_TUNE_CACHE", str(work / "cache-a"))
        rc = main(["sweep", "--space", str(space), "--data", str(data), "--results", uri, "--seed", "2"])
        before = pd.read_parquet(f"{uri}/remote/trials.parquet")
        study_before = study_states(work / "bucket" / "remote")
        mp.setenv("ASL_TUNE_CACHE", str(work / "cache-b"))
        rc_extend = main(["sweep", "--name", "remote", "--extend", "--num-samples", "1", "--results", uri])
    finally:
        mp.undo()
    return work, uri, rc, before, study_before, rc_extend


def test_a_sweep_with_results_at_a_uri_mirrors_its_files_there(uri_sweep):
    work, uri, rc, before, (n_study, states), _ = uri_sweep
    assert rc == 0
    assert len(before) == 2 and before["trial_id"].is_unique and set(before["status"]) == {"completed"}
    assert n_study == 2 and states == {"COMPLETE"}
    remote = work / "bucket" / "remote"
    mirrored = {"sweep.json", "space.yaml", "study.log", "trials.parquet", "epochs.parquet", "confusion.parquet", "per_class.parquet"}
    assert mirrored <= {p.name for p in remote.iterdir()}  # the tables: folders of parts (results/README.md)
    assert not [p.name for p in remote.rglob("*") if ".tmp" in p.name]  # every copy was renamed into place
    assert (remote / "run-1" / "tuner.pkl").is_file()  # Ray's run, at the URI too
    (staging,) = (work / "cache-a" / "sweeps").glob("*/remote")
    assert set(pd.read_parquet(staging / "trials.parquet")["trial_id"]) == set(before["trial_id"])
    for checkpoint in before["checkpoint"]:  # Ray keeps the checkpoints at the URI's run folder
        assert Path(checkpoint).is_relative_to(remote / "run-1")
        assert load_trained(Path(checkpoint).as_uri()).config.epochs == 1


def test_extend_from_an_empty_working_copy_continues_the_study_at_the_uri(uri_sweep):
    work, uri, _, before, _, rc_extend = uri_sweep
    assert rc_extend == 0
    remote = work / "bucket" / "remote"
    trials, _ = assert_consistent(remote, 3)
    assert set(before["trial_id"]) < set(trials["trial_id"])
    assert len(pd.read_parquet(f"{uri}/remote/trials.parquet")) == 3
    assert study_states(remote) == (3, {"COMPLETE"})  # one study, grown by one trial
    state = json.loads((remote / "sweep.json").read_text())
    assert [r["finished"] for r in state["runs"]] == [True, True] and state["storage"] == uri
    assert (remote / "run-2" / "tuner.pkl").is_file()
    (staging,) = (work / "cache-b" / "sweeps").glob("*/remote")
    assert len(read(staging, "trials")) == 3


def test_analyze_reads_results_at_a_uri(uri_sweep, capsys):
    work, uri, *_ = uri_sweep
    assert main(["analyze", "remote", "--results", uri]) == 0
    out = capsys.readouterr().out
    assert "remote: 3 trials" in out
    report = out.split("report: ", 1)[1].split()[0]
    assert report.endswith("/.analyze/remote/report/report.md") and Path(report).is_file()
    assert not (work / "bucket" / "remote" / "report").exists()  # the report stays local


def test_resume_on_another_machine_pulls_an_interrupted_sweep_from_the_uri(tmp_path, data, capsys):
    space = write_space(
        tmp_path / "moved.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 3},
        early_stopping=False,
    )
    uri = (tmp_path / "bucket").as_uri()
    remote = tmp_path / "bucket" / "moved"
    with cli(
        ["sweep", "--space", str(space), "--data", str(data), "--results", uri, "--max-concurrent", "1"],
        cwd=tmp_path,
        env={"ASL_TUNE_CACHE": str(tmp_path / "cache-a")},
    ) as driver:
        # The first epoch at the URI: the mirror copies results up while the sweep runs.
        wait_for(lambda: len(read(remote, "epochs")) >= 1, 240, driver, "the first epoch at the URI")
        wait_for_saved_state(remote / "run-1", time.time(), proc=driver)  # Tune's state there, from after that epoch
        kill_group(driver)
    assert not json.loads((remote / "sweep.json").read_text())["runs"][0]["finished"], "the kill came too late"
    started = set(read(remote, "trials")["trial_id"])
    (old_copy,) = (tmp_path / "cache-a" / "sweeps").glob("*/moved")
    old_mtime = (old_copy / "trials.parquet").stat().st_mtime_ns

    # Resume with another, empty cache folder: the recorder and the study Tune restores must use this one.
    assert main(["resume", "moved", "--results", uri]) == 0
    assert f"resuming sweep 'moved' from {uri}/moved/run-1" in capsys.readouterr().err
    trials, _ = assert_consistent(remote, 2)
    assert started <= set(trials["trial_id"])  # Tune restored the run (a fresh start would give new trial ids)
    assert set(trials["status"]) == {"completed"}
    assert study_states(remote) == (2, {"COMPLETE"})
    assert json.loads((remote / "sweep.json").read_text())["runs"][0]["finished"]
    assert (old_copy / "trials.parquet").stat().st_mtime_ns == old_mtime  # the first machine's copy was left alone


def _assert_train_img_per_s_means_one_thing(trial, epochs) -> None:
    """epochs.parquet: that epoch's images / its seconds of training; trials.parquet: images_seen / all of them."""
    rows = epochs.sort_values("epoch")
    images = np.diff([0, *rows["images_seen"]])  # each epoch's own training images
    own_seconds = images / rows["train_img_per_s"].to_numpy()
    assert trial.images_seen == images.sum() and (images > 0).all()
    assert trial.train_img_per_s == pytest.approx(images.sum() / own_seconds.sum(), rel=1e-9)
    assert rows["train_img_per_s"].iloc[-1] != trial.train_img_per_s  # the last epoch's own figure, not the trial's average


def test_train_img_per_s_means_the_same_in_a_sweep_and_in_train_out(faulty_sweep, data, tmp_path):
    from asl_tune.sweep.recorder import EPOCH_ROW as recorded
    from asl_tune.train import EPOCH_ROW

    assert recorded == EPOCH_ROW  # the recorder names the trainer's key without importing torch
    folder, before, _ = faulty_sweep
    trials, epochs = before["trials"], before["epochs"]
    healthy = trials[trials.status == "completed"].iloc[0]
    assert healthy.epochs_completed == 2
    _assert_train_img_per_s_means_one_thing(healthy, epochs[epochs.trial_id == healthy.trial_id])
    out = tmp_path / "one"
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--image-size",
                "32",
                "--head-width",
                "32",
                "--batch-size",
                "16",
                "--epochs",
                "2",
                "--threads",
                "1",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    one = pd.read_parquet(out / "trials.parquet").iloc[0]
    _assert_train_img_per_s_means_one_thing(one, pd.read_parquet(out / "epochs.parquet"))


# ---------------------------------------------------------------- what a sweep leaves behind in this process


def _process_settings() -> dict:
    """What a sweep changes for the whole process while it runs: the environment Ray reads, Optuna's verbosity,
    the level of a Ray logger it quietens, and the warning filters."""
    import logging
    import os
    import warnings

    import optuna

    from asl_tune.sweep.cluster import JOIN_ENV, LOCAL_ENV, SAVE_PERIOD_KEY
    from asl_tune.sweep.run import EXPERIMENT_ANALYSIS_LOGGER

    # Ours, and every variable that was there before; Ray may add its own (see cluster.scoped_environment).
    return {
        "environ": {k: os.environ.get(k) for k in [*LOCAL_ENV, *JOIN_ENV, SAVE_PERIOD_KEY, *_ENVIRON_BEFORE]},
        "optuna": optuna.logging.get_verbosity(),
        "logger": logging.getLogger(EXPERIMENT_ANALYSIS_LOGGER).level,
        "filters": list(warnings.filters),
    }


_ENVIRON_BEFORE = dict(__import__("os").environ)  # as this module found it


def test_a_sweep_leaves_the_process_settings_as_it_found_them_whether_it_finishes_or_is_refused(tmp_path, data, monkeypatch):
    import logging

    import optuna

    from asl_tune.errors import AslTuneError
    from asl_tune.sweep.cluster import LOCAL_ENV, SAVE_PERIOD_KEY
    from asl_tune.sweep.run import EXPERIMENT_ANALYSIS_LOGGER

    for key in [*LOCAL_ENV, SAVE_PERIOD_KEY]:
        if key != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER":  # conftest sets it for every test
            monkeypatch.delenv(key, raising=False)
    logger = logging.getLogger(EXPERIMENT_ANALYSIS_LOGGER)
    verbosity, level = optuna.logging.get_verbosity(), logger.level
    optuna.logging.set_verbosity(optuna.logging.INFO)  # settings a sweep changes while it runs, set to what it does not use
    logger.setLevel(logging.INFO)
    try:
        before = _process_settings()
        space = write_space(
            tmp_path / "scoped.yaml",
            1,
            params={"head_width": {"type": "categorical", "choices": [16]}},
            fixed={"epochs": 1},
            early_stopping=False,
        )
        folder = run_sweep(SweepRequest(space_path=space, data=data, results=tmp_path / "results"))
        assert set(read(folder, "trials")["status"]) == {"completed"}
        assert _process_settings() == before
        with pytest.raises(AslTuneError, match="--cpus-per-trial: the cluster has"):  # refused once Ray has started
            run_sweep(SweepRequest(space_path=space, data=data, name="refused", results=tmp_path / "results", cpus_per_trial=64))
        assert _process_settings() == before
    finally:
        optuna.logging.set_verbosity(verbosity)
        logger.setLevel(level)


def test_only_the_sweeps_own_warning_filter_is_taken_away_after_it():
    """A filter a library adds as it is first imported, inside the sweep (Ray's and torch's are), stays."""
    import warnings

    from asl_tune.sweep.run import _quiet

    before = list(warnings.filters)
    with _quiet():
        with warnings.catch_warnings(record=True) as caught:
            warnings.warn("The reported value is ignored because this `step=3` is already reported.", UserWarning)
        assert caught == []  # silenced during the sweep
        warnings.filterwarnings("ignore", message="a library's own filter")
        theirs = warnings.filters[0]
    assert warnings.filters == [theirs, *before]
