"""What a sweep promises about its search, run for real in one shared local Ray: ASHA stopping on images seen,
two objectives in one study, the seed reaching every trial, the confusion-pair rates a trial records, and
every shipped search space end to end at tiny settings."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import optuna
import pandas as pd
import pytest
import yaml
from conftest import class_image, make_dataset
from sweeps import assert_consistent, load_study, read, write_space

from asl_tune.cli import main
from asl_tune.data import load_dataset, make_splits
from asl_tune.sweep import cluster
from asl_tune.sweep.space import load_space, resolve
from asl_tune.sweep.study import TRIAL_ID_ATTR
from asl_tune.train import load_trained

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module", autouse=True)
def ray_for_the_module():
    """One local Ray for every sweep here: each sweep joins it instead of starting its own (5 s each)."""
    with cluster.ray_session(num_cpus=2):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), per_class=30, size=32)


def sweep(space: Path, data: Path, results: Path, *args: str) -> Path:
    assert main(["sweep", "--space", str(space), "--data", str(data), "--results", str(results), *args]) == 0
    return results / load_space(space).name


def n_train(data: Path, split: str = "blocked", split_seed: int = 0) -> int:
    ds = load_dataset(data, 32)
    return len(make_splits(ds.labels, ds.frames, split, split_seed).train)


# ---------------------------------------------------------------- early stopping


def test_asha_stops_a_trial_that_cannot_learn_at_its_first_rung_of_images_seen(tmp_path, data):
    space = write_space(
        tmp_path / "asha.yaml",
        2,
        params={"lr": {"type": "float", "low": 1e-6, "high": 0.1, "log": True}},
        fixed={"epochs": 3, "head_width": 32, "dropout": 0.0},
        early_stopping={"reduction_factor": 2, "grace_epochs": 1},
        points=[{"lr": 0.01}, {"lr": 1e-6}],  # one that learns first, then one that cannot
    )
    folder = sweep(space, data, tmp_path / "results", "--max-concurrent", "1")
    trials, epochs = assert_consistent(folder, 2)
    by_lr = trials.set_index("params_lr")
    full = n_train(data)
    learner, stuck = by_lr.loc[0.01], by_lr.loc[1e-6]
    assert stuck.status == "stopped_early" and stuck.epochs_completed == 1
    assert stuck.images_seen == full  # the first rung: one full training split of images
    assert list(epochs.loc[epochs.trial_id == stuck.trial_id, "epoch"]) == [1]
    assert learner.status == "completed" and learner.epochs_completed == 3 and learner.images_seen == 3 * full


# ---------------------------------------------------------------- several objectives


@pytest.fixture(scope="module")
def multi(tmp_path_factory, data) -> Path:
    """A finished sweep with two objectives, extended by one trial: 3 trials in one study."""
    work = tmp_path_factory.mktemp("multi")
    space = write_space(
        work / "multi.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 1},
        early_stopping=False,
        objectives=[{"metric": "val_accuracy", "mode": "max"}, {"metric": "n_parameters", "mode": "min"}],
    )
    folder = sweep(space, data, work / "results")
    assert main(["sweep", "--name", "multi", "--extend", "--num-samples", "1", "--results", str(work / "results")]) == 0
    return folder


def test_two_objectives_make_one_study_with_two_directions_that_extend_continues(multi):
    folder = multi
    study = load_study(folder)
    assert [s.study_name for s in study._storage.get_all_studies()] == ["multi"]  # the extension grew the same study, it did not add one
    assert study.directions == [optuna.study.StudyDirection.MAXIMIZE, optuna.study.StudyDirection.MINIMIZE]
    assert len(study.trials) == 3 and all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    trials, _ = assert_consistent(folder, 3)
    recorded = {(round(a, 6), int(n)) for a, n in zip(trials["val_accuracy"], trials["n_parameters"])}
    assert {(round(t.values[0], 6), int(t.values[1])) for t in study.trials} == recorded
    # Each study trial names its Parquet rows (the dashboard shows user attributes): the same values there.
    by_id = trials.set_index("trial_id")
    assert {t.user_attrs[TRIAL_ID_ATTR] for t in study.trials} == set(by_id.index)
    assert all(round(by_id.loc[t.user_attrs[TRIAL_ID_ATTR], "val_accuracy"], 6) == round(t.values[0], 6) for t in study.trials)


def test_optuna_dashboard_opens_the_sweeps_study_with_its_trials_and_values(multi, tmp_path):
    """`optuna-dashboard results/NAME/study.log`, as the README says, on 127.0.0.1: its API lists the
    study, its three trials, their two values and the asl-tune trial id of each."""
    dashboard = Path(sys.executable).with_name("optuna-dashboard")  # the venv's, as `pip install '.[test]'` puts it
    if not dashboard.exists():
        pytest.skip("optuna-dashboard is not installed (it is in the test extra)")
    port = free_port()
    server = subprocess.Popen(
        [str(dashboard), str(multi / "study.log"), "--host", "127.0.0.1", "--port", str(port), "--quiet"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        summaries = api_get(port, "/api/studies", server)["study_summaries"]
        assert [(s["study_name"], s["directions"]) for s in summaries] == [("multi", ["maximize", "minimize"])]
        trials = api_get(port, f"/api/studies/{summaries[0]['study_id']}", server)["trials"]
    finally:
        server.terminate()
        server.wait(timeout=30)
    recorded = read(multi, "trials").set_index("trial_id")
    assert len(trials) == 3 and {t["state"] for t in trials} == {"Complete"}
    for t in trials:
        tid = {a["key"]: a["value"] for a in t["user_attrs"]}[TRIAL_ID_ATTR]
        assert t["values"][0] == pytest.approx(recorded.loc[tid, "val_accuracy"]) and t["values"][1] == recorded.loc[tid, "n_parameters"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api_get(port: int, path: str, server: subprocess.Popen, timeout: float = 60) -> dict:
    """GET a JSON document from the dashboard, waiting for it to listen; fail with its stderr if it exits."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            assert server.poll() is None, server.stderr.read()
            assert time.monotonic() < deadline, f"optuna-dashboard did not answer on port {port} within {timeout:.0f} s"
            time.sleep(0.3)


# ---------------------------------------------------------------- the sweep's seed


def test_the_sweeps_seed_reaches_every_trial_and_fixes_one_split_for_all(tmp_path, data):
    space = write_space(
        tmp_path / "seeded.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 1, "split": "random"},
        early_stopping=False,
        points=[{"head_width": 32}, {"head_width": 32}],  # the same settings twice
    )
    runs = {}
    for seed in (0, 3):
        folder = sweep(space, data, tmp_path / f"results-{seed}", "--seed", str(seed))
        trials = read(folder, "trials")
        assert set(trials["params_seed"]) == {seed} and set(trials["params_split_seed"]) == {seed}
        nets = [load_trained(c) for c in trials["checkpoint"]]
        assert {(n.config.seed, n.config.split_seed) for n in nets} == {(seed, seed)}
        epochs = read(folder, "epochs")
        assert epochs["train_loss"].nunique() == 1  # same settings, same seed: the same trial twice
        runs[seed] = epochs["train_loss"].iloc[0]
    assert runs[0] != runs[3]  # another seed: other weights, order and split


def test_a_space_that_sets_seed_keeps_it_and_the_split_stays_the_sweeps(tmp_path, data):
    space = load_space(write_space(tmp_path / "own.yaml", 2, params={"seed": {"type": "categorical", "choices": [5, 6]}}))
    seeded = space.seeded(3)
    assert seeded.fixed["split_seed"] == 3 and "seed" not in seeded.fixed
    assert seeded.config({"seed": 6}).seed == 6 and seeded.config({"seed": 6}).split_seed == 3
    fixed = load_space(
        write_space(tmp_path / "fixed.yaml", 2, params={"lr": {"type": "float", "low": 0.01, "high": 0.1}}, fixed={"seed": 5})
    )
    assert fixed.seeded(3).config({"lr": 0.05}).seed == 5 and fixed.seeded(3).config({"lr": 0.05}).split_seed == 3


# ---------------------------------------------------------------- confusion-pair rates


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
    """A, B, R, U: every U image is the R image of the same frame, so no network can tell them apart."""
    root = tmp_path_factory.mktemp("twins")
    base = root / "asl_alphabet_train" / "asl_alphabet_train"
    for label, name in enumerate(["A", "B", "R", "U"]):
        (base / name).mkdir(parents=True)
        for n in range(1, 31):
            class_image(2 if name == "U" else label, n, 32).save(base / name / f"{name}{n}.jpg", quality=90)
    return root


def test_recorded_pair_rates_are_the_trials_confusion_counts_over_each_class_support(tmp_path, twins):
    space = write_space(
        tmp_path / "pairs.yaml",
        1,
        params={"lr": {"type": "float", "low": 0.005, "high": 0.05}},
        fixed={"epochs": 3, "head_width": 32, "dropout": 0.0},
        early_stopping=False,
        points=[{"lr": 0.01}],
    )
    folder = sweep(space, twins, tmp_path / "results")
    (row,) = read(folder, "trials").to_dict("records")
    confusion = read(folder, "confusion")
    counts = confusion.pivot_table(index="true_label", columns="pred_label", values="count", aggfunc="sum", fill_value=0)
    support = counts.sum(axis=1)
    recorded = {c: v for c, v in row.items() if c.startswith("pair_") and pd.notna(v)}
    assert {"pair_U_as_R", "pair_R_as_U"} <= set(recorded)
    for column, rate in recorded.items():
        true, pred = column[len("pair_") :].split("_as_")
        assert rate == pytest.approx(counts.get(pred, {}).get(true, 0) / support[true]), column
    # U and R look the same: each of their test frames is predicted alike, so what one gains the other loses.
    assert recorded["pair_U_as_R"] + recorded["pair_R_as_U"] > 0
    assert row["test_accuracy"] < 1.0


# ---------------------------------------------------------------- the shipped spaces


def tiny(space_file: Path, out: Path) -> Path:
    """A shipped space at test size: 32 px, batch 16, 1-2 epochs, 2 trials (or one per fixed point)."""
    raw = yaml.safe_load(space_file.read_text())
    raw["fixed"] = {**raw.get("fixed", {}), "image_size": 32, "batch_size": 16}
    if "epochs" in raw["params"]:
        raw["params"]["epochs"] = {"type": "int", "low": 1, "high": 2}
    else:
        raw["fixed"]["epochs"] = 1
    points = raw.get("points", [])
    for point in points:
        if "epochs" in point:
            point["epochs"] = 1
    raw["num_samples"] = max(2, len(points))
    path = out / space_file.name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.mark.parametrize("name", ["cpu-quick", "default", "seed-iterations"])
def test_every_shipped_space_runs_end_to_end_at_tiny_settings(tmp_path, data, name):
    shipped = resolve(name)
    space = tiny(shipped, tmp_path)
    loaded, original = load_space(space), load_space(shipped)
    assert (loaded.objectives, loaded.early_stopping, set(loaded.params)) == (
        original.objectives,
        original.early_stopping,
        set(original.params),
    )
    folder = sweep(space, data, tmp_path / "results")
    trials, _ = assert_consistent(folder, loaded.num_samples)
    assert trials["status"].isin(["completed", "stopped_early"]).all(), trials[["trial_id", "status", "error"]]
    assert (trials["params_image_size"] == 32).all()
