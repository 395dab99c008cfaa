"""The bench/ scripts run on a fresh install and print their keys; the search simulator follows Ray's ASHA rule.

These check that the scripts work and that their figures are well formed, never how fast anything
is: the figures themselves are measured on a quiet machine and kept in bench/RESULTS.md.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import search_efficiency  # noqa: E402  (bench/ is not a package: its scripts import each other as siblings)


def run_script(name: str, *args: str, timeout: float = 600) -> dict:
    """Run bench/<name> with --json the way a user would; return the JSON object on its last stdout line."""
    done = subprocess.run([sys.executable, str(BENCH / name), *args, "--json"], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


def positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_data_path_prints_the_three_throughputs(tiny_dataset):
    figures = run_script("data_path.py", "--data", str(tiny_dataset), "--image-size", "32", "--head-width", "32", "--epochs", "1")
    for key in ("trainer_img_per_s", "bare_img_per_s", "seed_pipeline_img_per_s"):
        assert positive(figures[key]), (key, figures[key])
    assert figures["image_size"] == 32
    from asl_tune.train import device_name, pick_device

    assert figures["device"] == device_name(pick_device())  # the trainer's choice, as the script makes it
    assert figures["trainer_vs_bare"] == pytest.approx(figures["trainer_img_per_s"] / figures["bare_img_per_s"])


def test_inference_prints_throughput_and_latency(tiny_dataset):
    figures = run_script(
        "inference.py",
        "--data",
        str(tiny_dataset),
        "--image-size",
        "32",
        "--head-width",
        "32",
        "--device",
        "cpu",
        "--repeats",
        "2",
        "--budget-s",
        "0.2",
        timeout=300,
    )
    for key in ("infer_img_per_s", "latency_ms_p50", "latency_ms_p95", "n_parameters", "wall_s"):
        assert positive(figures[key]), (key, figures[key])
    assert figures["latency_ms_p50"] <= figures["latency_ms_p95"]
    assert isinstance(figures["keeps_up_30fps"], bool)
    assert figures["keeps_up_30fps"] == (figures["latency_ms_p95"] <= 1000 / 30)
    assert len(figures["infer_img_per_s_rounds"]) == 2 and all(positive(v) for v in figures["infer_img_per_s_rounds"])
    assert figures["infer_img_per_s"] == pytest.approx(
        sorted(figures["infer_img_per_s_rounds"])[0] / 2 + sorted(figures["infer_img_per_s_rounds"])[1] / 2
    )
    assert (figures["image_size"], figures["head_width"], figures["batch_size"], figures["device"]) == (32, 32, 64, "cpu")


def test_speed_alone_compares_analyzes_figure_with_the_inference_bench(tiny_dataset):
    figures = run_script(
        "speed_alone.py",
        "--data",
        str(tiny_dataset),
        "--image-size",
        "32",
        "--head-width",
        "16",
        "--threads",
        "1",
        "--repeats",
        "2",
        "--budget-s",
        "0.1",
        "--batches",
        "2",
        "--latencies",
        "10",
        timeout=300,
    )
    for key in ("infer_img_per_s", "latency_ms_p50", "latency_ms_p95"):
        assert (
            positive(figures[f"bench_{key}"])
            and len(figures[f"analyze_{key}"]) == 2
            and all(positive(v) for v in figures[f"analyze_{key}"])
        )
        analyze = statistics.median(figures[f"analyze_{key}"])
        assert figures[f"deviation_{key}"] == pytest.approx(abs(analyze / figures[f"bench_{key}"] - 1))
        worst = max(abs(v / figures[f"bench_{key}"] - 1) for v in figures[f"analyze_{key}"])
        assert figures[f"largest_deviation_{key}"] == pytest.approx(worst) and worst >= figures[f"deviation_{key}"]
        assert figures[f"bench_spread_{key}"] == pytest.approx(
            max(abs(v / figures[f"bench_{key}"] - 1) for v in figures[f"bench_{key}_rounds"])
        )
    assert figures["within_10pct"] == (figures["deviation_infer_img_per_s"] <= 0.1 and figures["deviation_latency_ms_p50"] <= 0.1)
    assert (figures["classes"], figures["timed"]["batches"], figures["timed"]["latencies"]) == (5, 2, 10)


def test_inference_refuses_bad_settings_in_one_line(tiny_dataset):
    for args, message in (
        (["--repeats", "0"], "--repeats and --threads must be >= 1"),
        (["--image-size", "16"], "--image-size: must be >= 32"),
        (["--data", str(tiny_dataset / "none")], "--data: "),
    ):
        done = subprocess.run([sys.executable, str(BENCH / "inference.py"), *args, "--json"], capture_output=True, text=True, timeout=300)
        assert done.returncode == 2, done.stderr[-2000:]
        assert message in done.stderr.strip().splitlines()[-1], done.stderr[-2000:]


def test_overhead_runs_a_real_sweep_and_the_same_trials_alone(tiny_dataset):
    figures = run_script(
        "overhead.py",
        "--data",
        str(tiny_dataset),
        "--image-size",
        "32",
        "--head-width",
        "32",
        "--epochs",
        "1",
        "--trials",
        "2",
        "--alone-runs",
        "1",
    )
    assert figures["sweep_trials_completed"] == 2
    assert figures["concurrency"] == 2
    for key in ("sweep_wall_s", "trial_compute_s", "overhead_ratio", "ray_start_s"):
        assert positive(figures[key]), (key, figures[key])
    assert figures["overhead_ratio"] == pytest.approx(figures["sweep_wall_s"] / (figures["trial_compute_s"] / 2))
    assert figures["sweep_wall_s"] > figures["ray_start_s"]


def test_scale_runs_asl_tunes_stack_and_bare_tune_and_the_recorder_microbench():
    figures = run_script(
        "scale.py", "--sizes", "6", "--epochs", "2", "--micro-trials", "10", "--micro-epochs", "2", "--micro-compare", timeout=300
    )
    assert figures["n_trials"] == [6]
    for key in (
        "asl_tune_wall_s",
        "bare_tune_wall_s",
        "ratio_vs_bare_tune",
        "driver_cpu_s_per_result",
        "mirror_wall_s",
        "tune_optuna_wall_s",
        "ratio_vs_tune_optuna",
    ):
        assert set(figures[key]) == {"6"} and positive(figures[key]["6"]), key  # per size: JSON names N as a string
    assert figures["ratio_vs_bare_tune"]["6"] == pytest.approx(figures["asl_tune_wall_s"]["6"] / figures["bare_tune_wall_s"]["6"])
    assert positive(figures["recorder_cost_growth"]) and positive(figures["driver_peak_rss_mb"])
    # Each run's own peak, sampled while it ran: asl-tune's highest (with the micro bench's) is the headline;
    # a sampled peak can't exceed the process's true one (ru_maxrss), all settings included.
    peaks = {s: figures["runs"][s]["6"]["driver_peak_rss_mb"] for s in figures["runs"]}
    assert all(positive(v) for v in peaks.values()) and positive(figures["micro"]["peak_rss_mb"])
    assert figures["driver_peak_rss_mb"] == max(peaks["asl_tune"], peaks["asl_tune_mirror"], figures["micro"]["peak_rss_mb"])
    assert figures["driver_peak_rss_mb"] <= figures["process_peak_rss_mb"] * 1.01
    # What Tune keeps a trial: less once the parts only the files need are dropped (a 29 x 29 confusion matrix among them).
    assert 0 < figures["tune_trial_kb"]["parts_dropped"] < figures["tune_trial_kb"]["whole"]
    assert figures["ratio_vs_tune_optuna"]["6"] == pytest.approx(figures["asl_tune_wall_s"]["6"] / figures["tune_optuna_wall_s"]["6"])
    for setting in ("bare_tune", "tune_optuna", "asl_tune", "asl_tune_mirror"):  # 2 epochs is within ASHA's grace: every trial runs both
        assert (figures["runs"][setting]["6"]["results"], figures["runs"][setting]["6"]["errors"]) == (12, 0), setting
    ours = figures["runs"]["asl_tune_mirror"]["6"]
    parts = ours["files_bytes"]["trials.parquet"]["files"]
    assert parts == ours["uri_files_bytes"]["trials.parquet"]["files"]  # every part copied up
    assert 2 <= parts <= 1 + 6  # schema part + a part per flush that ended trials (short trials share one), at most one per trial
    assert ours["files_bytes"]["study.log"]["files"] == ours["uri_files_bytes"]["study.log"]["files"] == 1  # the study's journal, copied up
    assert set(figures["micro"]["growth"]) == {"recorder", "study", "optuna_journal", "sqlite", "recorder_and_study"}
    assert figures["recorder_cost_growth"] == figures["micro"]["growth"]["recorder_and_study"]


def test_scale_bookkeeping_runs_rays_test_shape_under_both_stacks_on_the_cpus_it_is_told():
    """--cpus 4 on any machine (the trials sleep): theory N / 4 s; asl-tune's stack with the random sampler writes every trial."""
    figures = run_script(
        "scale.py", "--bookkeeping", "--sizes", "4", "--cpus", "4", "--sampler", "random", "--micro-trials", "0", timeout=300
    )
    assert (figures["ray_cpus"], figures["sampler"]) == (4, "random")
    for setting in ("bare_tune", "asl_tune"):
        run = figures["runs"][setting]["4"]
        assert (run["trials"], run["results"], run["errors"], run["cpus"], run["theory_s"]) == (4, 4, 0, 4, 1.0), setting
        assert run["ratio"] == pytest.approx(run["wall_s"] / 1.0) and run["ratio"] >= 1  # no faster than theory: each trial sleeps 1 s
    assert figures["bookkeeping_ratio"]["4"] == figures["runs"]["asl_tune"]["4"]["ratio"]


@pytest.mark.parametrize("grid", ["grid", "grid-e8"])
def test_search_efficiency_replays_the_committed_grids(grid):
    figures = run_script("search_efficiency.py", "--grid", str(BENCH / grid), "--seeds", "4")
    assert figures["grid_informative"] is True
    assert figures["n_configs"] == 16
    assert 0 <= figures["accuracy_gap_pp"] <= 100 * figures["grid_best"]
    assert 0 < figures["asha_total_compute_fraction"] <= 1.0 + 1e-9  # never more images than running every trial to the end
    if figures["reached_share"] > 0:
        assert 0 < figures["asha_compute_fraction"] <= figures["asha_total_compute_fraction"] + 1e-9


def test_search_efficiency_refuses_a_missing_grid(tmp_path):
    done = subprocess.run(
        [sys.executable, str(BENCH / "search_efficiency.py"), "--grid", str(tmp_path / "none"), "--json"], capture_output=True, text=True
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"search_efficiency.py: no recorded grid in {tmp_path / 'none'}; run with --record first"]


class _Named:
    def __init__(self, trial_id: str):
        self.trial_id = trial_id


@pytest.mark.parametrize("rf, min_t, max_t", [(3, 1, 9), (2, 2, 16), (4, 1, 8), (3, 100, 800)])
def test_the_simulated_asha_decides_as_rays_own_bracket(rf, min_t, max_t):
    """Same results in, same stop/continue decisions out, as Ray's _Bracket with stop_last_trials=False."""
    from ray.tune.schedulers.async_hyperband import _Bracket
    from ray.tune.schedulers.trial_scheduler import TrialScheduler

    rng = np.random.default_rng(rf * 1000 + min_t)
    for _ in range(20):
        ours = search_efficiency.Asha(min_t, max_t, rf)
        rays = _Bracket(min_t, max_t, rf, s=0, stop_last_trials=False)
        step = min_t / 2
        progress = {f"t{k}": 0.0 for k in range(12)}
        running = set(progress)
        decisions = 0
        while running:
            trial = sorted(running)[rng.integers(len(running))]
            progress[trial] += step
            value = float(rng.random())
            keep = ours.keep_going(trial, progress[trial], value)
            ray_keep = rays.on_result(_Named(trial), progress[trial], value) == TrialScheduler.CONTINUE
            assert keep == ray_keep, (trial, progress[trial], value)
            decisions += 1
            if not keep or progress[trial] >= max_t:
                running.discard(trial)
        assert decisions > 12


def test_gpu_script_smoke_runs_every_section_and_names_every_headline_key():
    """bench/gpu.py --smoke: every section at tiny sizes on the CPU (packing and the full-size sweep without GPU shares), none fails."""
    figures = run_script("gpu.py", "--smoke")
    for key in (
        "device",
        "torch",
        "train_img_per_s",
        "seed_pipeline_img_per_s",
        "trainer_vs_seed",
        "mfu",
        "packed_aggregate_img_per_s",
        "sweep_trials_completed",
    ):
        assert key in figures, key
    assert figures["smoke"] is True and figures["torch"] == __import__("torch").__version__
    for section in ("fullsize_sweep", "trainer", "seed", "compute", "profile", "packing"):
        assert "error" not in figures[section], figures[section].get("traceback")
        assert figures[section]["section_s"] >= 0
    assert set(figures["train_img_per_s"]) == {"fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile"}
    for mode in ("fp32", "bf16", "bf16_channels_last"):
        assert positive(figures["train_img_per_s"][mode]), mode
    assert positive(figures["seed_pipeline_img_per_s"]) and positive(figures["trainer"]["trainer_train_img_per_s"])
    assert figures["trainer_vs_seed"] == pytest.approx(figures["trainer"]["trainer_train_img_per_s"] / figures["seed_pipeline_img_per_s"])
    # Backward costs about twice forward.
    assert figures["compute"]["flops_per_train_image"] > 2 * figures["compute"]["flops_per_infer_image"] > 0
    assert figures["profile"]["top"] and sum(k["share"] for k in figures["profile"]["top"]) <= 1.0 + 1e-9
    # Packing and the sweep run on the CPU too (no GPU share to split), so their code cannot rot between GPU sessions.
    assert set(figures["packed_aggregate_img_per_s"]) == {"2"} and all(positive(v) for v in figures["packed_aggregate_img_per_s"].values())
    # The full-size section at smoke size: 29 x 12 names hard-linked to the 6 rendered frames a class, one trainer alone, 2 trials.
    full = figures["fullsize_sweep"]
    assert full["n_images"] == 29 * 12 and full["distinct_jpegs"] == 29 * 6
    assert full["exit_status"] == 0 and full["stopped_at_timeout"] is False
    assert full["trials_completed"] == figures["sweep_trials_completed"] == 2
    assert 1 <= full["most_at_once"] <= 2 and positive(full["wall_s"]) and positive(full["trials_span_s"])
    assert positive(full["one_steady_img_per_s"]) and positive(full["aggregate_train_img_per_s"])
    assert full["aggregate_vs_one"] == pytest.approx(full["aggregate_train_img_per_s"] / full["one_steady_img_per_s"])
    assert positive(full["trial_avg_vs_steady"]) and positive(full["trial_host_uss_mb"]) and positive(full["trial_host_anon_mb"])
    assert 1 <= full["trial_workers_seen"] <= 2 and len(full["trials"]) == 2
    for trial in full["trials"]:
        assert 0.2 <= trial["data_fraction"] <= 1.0 and len(trial["epoch_img_per_s"]) == 2 and positive(trial["avg_vs_steady"])
    if figures["device"] == "cpu":
        assert full["devices"] == ["cpu"] and figures["mfu"] is None
        assert full["gpu_busy_share"] is None and full["gpu_sampler"] is None  # no GPU to sample


@pytest.mark.slow
def test_fullsize_smoke_builds_a_hard_linked_standin_and_measures_a_real_sweep_at_each_size():
    """bench/fullsize.py --smoke: the stand-in's JPEGs are hard links, each size's sweep completes, and every key is there."""
    figures = run_script("fullsize.py", "--smoke", timeout=900)
    assert figures["n_images"] == 29 * 30 and figures["smoke"] is True
    assert figures["distinct_jpegs"] == 29 * 3  # 30 names per class, hard links to 3 rendered frames
    for size in ("32",):
        run = figures[size]
        assert run["completed"] is True and run["exit_status"] == 0, run
        assert run["trial_workers_seen"] >= 1 and positive(run["trial_anon_mb"])
        # USS while both trials ran, and once one was left alone: which samples saw which depends on the machine's speed
        assert positive(run["trial_uss_mb"]) or positive(run["trial_uss_alone_mb"]), run
        assert positive(run["driver_uss_mb"]) and positive(run["driver_rss_mb"]) and run["driver_uss_mb"] <= run["driver_rss_mb"]
        assert run["spilled_mb"] == 0 and positive(run["wall_s"]) and positive(run["first_result_s"])
        assert run["decode_s"] >= 0 and run["handoff_s"] >= 0
        assert run["plan"].startswith("memory plan: 870 images") and run["plan"].endswith("fits")
        assert len(run["trial_peak_private_mb"]) == 2 and all(positive(v) for v in run["trial_peak_private_mb"])
