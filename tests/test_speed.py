"""Speed measured alone (asl_tune.analysis.speed), on a real tiny sweep: each architecture timed once and
cached, the same figure for every trial of one architecture, the same front from two analyze runs, and
the exact cost columns (flops_per_image, n_parameters) as objectives of the sweep and of the front."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from conftest import make_dataset
from sweeps import write_space

from asl_tune.analysis.compute import load_sweep, pareto_front
from asl_tune.analysis.speed import DURING_TRAINING, SPEED_FILE, UNDER_LOAD, architectures, speed_on, use_speed
from asl_tune.cli import main
from asl_tune.errors import AslTuneError
from asl_tune.model import DexNet, flops_per_image
from asl_tune.sweep import cluster

pytestmark = pytest.mark.timeout(300)

COSTS = [("val_accuracy", "max"), ("flops_per_image", "min")]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """A finished sweep `tiny`: three trials at 32 px, two of head width 16 and one of 32, searched for accuracy and FLOPs."""
    root = tmp_path_factory.mktemp("speed")
    data = make_dataset(root / "data", per_class=12, size=32)
    space = write_space(
        root / "tiny.yaml",
        3,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 1},
        early_stopping=False,
        points=[{"head_width": 16}, {"head_width": 32}, {"head_width": 16}],
        objectives=[{"metric": m, "mode": mode} for m, mode in COSTS],
    )
    with cluster.ray_session(num_cpus=2):
        assert main(["sweep", "--space", str(space), "--data", str(data), "--results", str(root / "results")]) == 0
    return root / "results"


def test_every_trial_records_its_forward_flops_and_a_sweep_can_search_on_them(results):
    trials = pd.read_parquet(results / "tiny" / "trials.parquet")
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}
    for _, row in trials.iterrows():
        assert row["flops_per_image"] == flops_per_image(DexNet(int(row["params_head_width"]), 32, 5))
    front = pareto_front(trials, COSTS)
    assert len(front) >= 1 and set(front["flops_per_image"]) <= set(trials["flops_per_image"])


def test_two_analyze_runs_measure_each_architecture_once_and_give_the_same_front(results):
    folder = results / "tiny"
    assert main(["analyze", "tiny", "--results", str(results), "--threads", "1"]) == 0  # --speed-on cpu is the default
    speed = pd.read_parquet(folder / SPEED_FILE)
    assert sorted(speed["head_width"]) == [16, 32] and set(speed["num_classes"]) == {5} and set(speed["threads"]) == {1}
    cached, front = (folder / SPEED_FILE).read_bytes(), pd.read_parquet(folder / "report" / "pareto_front.parquet")
    md = (folder / "report" / "report.md").read_text()
    assert "measured alone on cpu: " in md and "(1 thread, fp32)" in md and UNDER_LOAD + "infer_img_per_s" in md
    assert "1-minute load average of" in md and speed["load_avg_1min"].notna().all()

    assert main(["analyze", "tiny", "--results", str(results), "--speed-on", "cpu", "--threads", "1"]) == 0
    assert (folder / SPEED_FILE).read_bytes() == cached  # nothing measured, nothing added
    pd.testing.assert_frame_equal(pd.read_parquet(folder / "report" / "pareto_front.parquet"), front)


def test_trials_of_one_architecture_get_one_speed_figure_and_keep_their_own_under_load(results):
    sweep = load_sweep(results, "tiny", COSTS)
    alone = use_speed(sweep, speed_on("cpu", 1)).trials
    per_width = alone.groupby("params_head_width")[["infer_img_per_s", "latency_ms_p50", "latency_ms_p95"]].nunique()
    assert (per_width == 1).all().all() and len(per_width) == 2
    assert list(alone[UNDER_LOAD + "infer_img_per_s"]) == list(sweep.trials["infer_img_per_s"])
    kept = use_speed(sweep, speed_on(DURING_TRAINING))
    assert (
        list(kept.trials["infer_img_per_s"]) == list(sweep.trials["infer_img_per_s"]) and "during training, under load" in kept.speed_note
    )


def test_speed_during_training_is_still_there_when_asked_for(results):
    assert (
        main(["analyze", "tiny", "--results", str(results), "--speed-on", "training", "--objectives", "val_accuracy:max,n_parameters:min"])
        == 0
    )
    md = (results / "tiny" / "report" / "report.md").read_text()
    assert "measured during training, under load: each trial timed itself once" in md and "measured alone" not in md


@pytest.mark.parametrize(
    "args, message",
    [
        (["--speed-on", "gpu"], "--speed-on: must be cpu, cuda or training, got 'gpu'"),
        (["--threads", "0"], "--threads: must be >= 1, got 0"),
        (["--speed-on", "training", "--threads", "2"], "--threads: applies to --speed-on cpu or cuda only"),
        pytest.param(
            ["--speed-on", "cuda"],
            "--speed-on: cuda needs a GPU",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU"),
        ),
    ],
)
def test_bad_speed_options_are_refused_in_one_line(tmp_path, capsys, args, message):
    assert main(["analyze", "any", "--results", str(tmp_path), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_a_trial_without_its_architecture_is_named():
    trials = pd.DataFrame(
        {"trial_id": ["a"], "status": ["completed"], "params_head_width": [16], "params_image_size": [32], "n_parameters": [None]}
    )
    with pytest.raises(AslTuneError, match="--speed-on: trial a does not record its architecture"):
        architectures(trials)
    trials["n_parameters"] = sum(p.numel() for p in DexNet(16, 32, 7).parameters())
    assert architectures(trials)["num_classes"].tolist() == [7]
