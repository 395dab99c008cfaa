"""Faults a long sweep meets: killed workers, a driver killed again and again, concurrent readers and drivers,
a failing disk, and what must not be exposed or vary."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
import ray
from conftest import make_dataset
from sweeps import (
    RAY_TABLES,
    assert_consistent,
    cli,
    kill_group,
    load_study,
    read,
    run_cli,
    run_to_end,
    study_states,
    wait_for,
    wait_for_saved_state,
    write_space,
)

from asl_tune.results import ResultsStore, read_epochs, read_trials, trial_row
from asl_tune.sweep import cluster
from asl_tune.sweep.trainable import FAULT_ENV, WORK_PREFIX

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), per_class=60, size=32)


def trial_workers(session: int) -> list[int]:
    """PIDs of Ray trial workers (process title ray::ImplicitFunc...) in the driver's session."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().split(b"\0")[0]
            if title.startswith(b"ray::ImplicitFunc") and os.getsid(int(entry.name)) == session:
                pids.append(int(entry.name))
        except (OSError, ProcessLookupError):
            continue
    return pids


def test_a_killed_trial_worker_is_retried_from_its_checkpoint(tmp_path, data):
    space = write_space(
        tmp_path / "workers.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 5},
        early_stopping=False,
    )
    folder = tmp_path / "results" / "workers"
    scratch = tmp_path / "tmp"  # the workers' temp folder, where each trial keeps its scratch checkpoints
    scratch.mkdir()
    env = {"TMPDIR": str(scratch), "RAY_TMPDIR": tempfile.gettempdir()}  # Ray's sockets stay at their short usual path
    with cli(
        ["sweep", "--space", str(space), "--data", str(data), "--results", str(tmp_path / "results"), "--max-concurrent", "1"],
        cwd=tmp_path,
        env=env,
    ) as driver:
        wait_for(lambda: (read(folder, "epochs")["epoch"] >= 2).any(), 240, driver, "a trial's second epoch")
        assert list(scratch.glob(f"{WORK_PREFIX}*")), "no trial scratch folder where the test looks"
        victims = trial_workers(driver.pid)
        assert victims, "no trial worker found to kill"
        seen = read(folder, "epochs")
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out = run_to_end(driver, 400)
    trials, epochs = assert_consistent(folder, 2)
    assert set(trials["status"]) == {"completed"}, out[-3000:]
    # The killed trial continued: the epochs it finished before the kill were not trained again.
    killed = seen.groupby("trial_id")["epoch"].max().idxmax()
    before = seen[seen.trial_id == killed].set_index("epoch")
    after = epochs[epochs.trial_id == killed].set_index("epoch")
    assert list(after.index) == [1, 2, 3, 4, 5]
    for epoch in before.index[:-1]:
        assert after.loc[epoch, "seconds"] == before.loc[epoch, "seconds"], epoch
    # The killed worker could not remove its scratch folder; the retried trial's worker did.
    assert not list(scratch.glob(f"{WORK_PREFIX}*"))


def test_chaos_three_driver_kills_then_resume(tmp_path, data):
    """Kill the driver at three random moments; resume each time; the sweep ends whole.

    Where a kill lands is left to chance, and each outcome is accepted: mid-sweep (the next `resume` goes on),
    after the sweep finished but before the driver exited (the next `resume` says there is nothing to resume
    and succeeds), or never, the driver having exited first. Whichever came, the sweep ends with its 3 trials."""
    rng = random.Random(20261125)
    space = write_space(
        tmp_path / "chaos.yaml",
        3,
        params={
            "head_width": {"type": "categorical", "choices": [16, 24, 32]},
            "lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
        },
        fixed={"epochs": 3},
        early_stopping=False,
    )
    results = ["--results", str(tmp_path / "results")]
    folder = tmp_path / "results" / "chaos"
    command = ["sweep", "--space", str(space), "--data", str(data), "--max-concurrent", "2", *results]
    outcomes = []
    for _ in range(3):
        rows = len(read(folder, "epochs"))
        with cli(command, cwd=tmp_path) as driver:
            # A random moment once this driver's trials report (Ray's start takes 5 s here, more on a loaded
            # machine, where a fixed delay killed the first driver before the sweep existed): the point of the drill.
            wait_for(lambda: driver.poll() is not None or len(read(folder, "epochs")) > rows, 240)
            time.sleep(rng.uniform(0.0, 3.0))
            if driver.poll() is not None:  # it ended before the kill: the sweep finished (or had, for a resume)
                out = driver.stdout.read()
                assert driver.returncode == 0, out[-3000:]
                outcomes.append("exited")
                break
            kill_group(driver)
        assert (folder / "sweep.json").exists()
        finished = json.loads((folder / "sweep.json").read_text())["runs"][-1]["finished"]
        outcomes.append("killed after the sweep finished" if finished else "killed")
        command = ["resume", "chaos", *results]
    if outcomes[-1] != "exited":
        out = run_cli(command, tmp_path, 400)
        if outcomes[-1] == "killed after the sweep finished":
            assert "sweep 'chaos' has nothing to resume: all 3 trials finished" in out, out[-3000:]
    trials, _ = assert_consistent(folder, 3)
    assert set(trials["status"]) == {"completed"}
    assert study_states(folder) == (3, {"COMPLETE"})


def test_resume_reconciles_a_study_ahead_of_tunes_saved_state_and_a_trial_tune_forgot(tmp_path, data):
    """The two windows a driver SIGKILL can hit, forced: the study finished a trial that Tune's saved state still
    runs (it is re-run from its checkpoint and reports again), and the study and the Parquet files hold a trial
    started after Tune's last save (Tune restores without it, and asks the searcher for it again).

    The kill is forced into the first trial, at any machine speed: that trial holds after its second epoch
    (FAULT_ENV hold@2) until the kill. Left to chance, a fast machine finished it before the kill, and the second,
    last trial ran then: Tune's saved state held every trial, so a trial "started after Tune's last save" could not
    be (no driver makes one then), and the orphan the test made was left waiting in the study, never asked for."""
    space = write_space(
        tmp_path / "window.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 4},
        early_stopping=False,
    )
    results = ["--results", str(tmp_path / "results")]
    folder = tmp_path / "results" / "window"
    command = ["sweep", "--space", str(space), "--data", str(data), "--max-concurrent", "1", *results]
    with cli(command, cwd=tmp_path, env={FAULT_ENV: "hold@2"}) as driver:
        wait_for(lambda: (read(folder, "epochs")["epoch"] >= 2).any(), 240, driver, "the first trial's second epoch")
        wait_for_saved_state(folder / "ray" / "run-1", time.time(), proc=driver)  # it holds: this state has its epoch 2
        kill_group(driver)
    study = load_study(folder)
    # The premise, forced: one trial, running (Tune had not asked for the second), its two epochs reported.
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.RUNNING]
    (running,) = study.trials
    assert sorted(running.intermediate_values) == [1, 2]
    study.tell(running.number, 0.125)  # what the driver told the study just before the kill
    orphan = study.ask(fixed_distributions={"head_width": optuna.distributions.CategoricalDistribution([16, 32])})
    store = ResultsStore(folder)  # ... and the trial it started then, whose first rows the recorder wrote
    store.put_trial(trial_row("forgotten", "running", {"head_width": orphan.params["head_width"]}, {}))
    store.put_epoch("forgotten", {"epoch": 1, "images_seen": 10})
    store.flush()

    out = run_cli(["resume", "window", *results], tmp_path, 400)
    assert "trial forgotten started after Tune last saved its state" in out
    trials, _ = assert_consistent(folder, 2)
    assert "forgotten" not in set(trials["trial_id"]) and set(trials["status"]) == {"completed"}
    study = load_study(folder)
    assert len(study.trials) == 2 and {t.state for t in study.trials} == {optuna.trial.TrialState.COMPLETE}
    assert study.trials[running.number].value == 0.125  # the study keeps what it was told first
    assert study.trials[orphan.number].params == orphan.params  # Tune's next trial took the orphan's settings
    assert sorted(trials["params_head_width"]) == sorted(t.params["head_width"] for t in study.trials)


def test_a_second_driver_on_a_running_sweep_is_refused(tmp_path, data):
    space = write_space(
        tmp_path / "busy.yaml",
        1,
        params={"head_width": {"type": "categorical", "choices": [16]}},
        fixed={"epochs": 3},
        early_stopping=False,
    )
    results = ["--results", str(tmp_path / "results")]
    folder = tmp_path / "results" / "busy"
    with cli(["sweep", "--space", str(space), "--data", str(data), *results], cwd=tmp_path) as driver:
        wait_for(lambda: (folder / "sweep.json").exists(), 120, driver, "the sweep to start")
        for args in (["resume", "busy"], ["sweep", "--name", "busy", "--extend", "--num-samples", "1"], ["sweep", "--space", str(space)]):
            proc = subprocess.run(
                [sys.executable, "-m", "asl_tune", *args, *results], capture_output=True, text=True, cwd=tmp_path, timeout=120
            )
            assert proc.returncode == 2, proc.stderr
            assert ("being run by another asl-tune process" in proc.stderr) or ("already exists" in proc.stderr), proc.stderr
        run_to_end(driver, 300)
    assert_consistent(folder, 1)


def test_two_sweeps_started_under_one_name_at_once_one_runs_and_the_other_touches_nothing(tmp_path, data):
    """The loser of the lock used to delete the folder, the winner's lock file with it, while the winner started Ray."""
    space = write_space(
        tmp_path / "race.yaml",
        1,
        params={"head_width": {"type": "categorical", "choices": [16]}},
        fixed={"epochs": 1},
        early_stopping=False,
    )
    command = ["sweep", "--space", str(space), "--data", str(data), "--results", str(tmp_path / "results")]
    with cli(command, cwd=tmp_path) as first, cli(command, cwd=tmp_path) as second:
        outs = [p.communicate(timeout=300)[0] for p in (first, second)]
        codes = sorted(p.returncode for p in (first, second))
    assert codes == [0, 2], outs
    loser = outs[[first.returncode, second.returncode].index(2)]
    last = loser.strip().splitlines()[-1]  # after the data's decoding progress
    assert "Traceback" not in loser and ("being run by another asl-tune process" in last or "already exists" in last), loser
    trials, _ = assert_consistent(tmp_path / "results" / "race", 1)
    assert set(trials["status"]) == {"completed"}


def test_readers_see_whole_files_while_a_writer_rewrites_them(tmp_path):
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
        from asl_tune.results import ResultsStore, trial_row
        store = ResultsStore({str(tmp_path)!r})
        for i in range(300):
            store.put_trial(trial_row(f"t{{i:04d}}", "completed", {{"lr": 0.01}}, {{"val_accuracy": 0.5}}))
            store.put_epoch(f"t{{i:04d}}", {{"epoch": 1, "val_accuracy": 0.5, "images_seen": 10}})
            store.flush()
    """),
        ]
    )
    counts, writing = [], True
    while writing or len(counts) < 5:
        writing = writer.poll() is None  # before the read: the last read starts after the last write
        trials, epochs = read_trials(tmp_path), read_epochs(tmp_path)  # raises on a torn file
        counts.append(len(trials))
        assert trials["trial_id"].is_unique and not epochs.duplicated(["trial_id", "epoch"]).any()
    assert writer.returncode == 0
    assert counts == sorted(counts) and counts[-1] == 300  # each read is a whole snapshot, never older than the last
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epochs.parquet", "trials.parquet"]  # no temporaries left


def test_a_write_that_fails_midway_keeps_the_previous_file(tmp_path):
    """A real failing write (a file-size limit makes the kernel refuse it), not a simulated one."""
    store = ResultsStore(tmp_path)
    store.put_trial(trial_row("kept", "completed", {"lr": 0.01}, {"val_accuracy": 0.9}))
    store.flush()
    script = textwrap.dedent(f"""
        import resource, signal, sys
        from asl_tune.errors import AslTuneError
        from asl_tune.results import ResultsStore, trial_row
        store = ResultsStore({str(tmp_path)!r})
        for i in range(2000):
            store.put_trial(trial_row(f"new{{i}}", "completed", {{"lr": 0.01, "note": "x" * 200}}, {{"val_accuracy": 0.5}}))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get an error from write(), as a full disk gives
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            store.flush()
        except AslTuneError as e:
            print(e)
            sys.exit(2)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot write" in proc.stdout and "the previous file is left intact" in proc.stdout
    assert list(pd.read_parquet(tmp_path / "trials.parquet")["trial_id"]) == ["kept"]
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]


def test_a_local_ray_listens_on_loopback_without_a_dashboard_and_starts_its_workers_warm():
    @ray.remote(num_cpus=0)
    def trainer_imported() -> bool:
        return "asl_tune.train" in sys.modules  # a fresh worker imports nothing of ours unless the warm-up hook ran

    with cluster.ray_session(num_cpus=1):
        nodes = ray.nodes()
        assert nodes and all(n["NodeManagerAddress"] == "127.0.0.1" for n in nodes)
        assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
        node = ray._private.worker.global_worker.node
        assert not node.address_info.get("webui_url")
        assert ray.get(trainer_imported.remote()) is True
    assert not ray.is_initialized()


def test_same_seed_gives_the_same_configurations_and_metrics(tmp_path, data):
    """The README's promise in its scope: one machine, one software stack (both sweeps run here, one after the other).
    Across machines the metrics may differ (torch's CPU kernels round by processor and thread count); no test claims they do not."""
    space = write_space(
        tmp_path / "again.yaml",
        2,
        params={
            "head_width": {"type": "categorical", "choices": [16, 24, 32]},
            "lr": {"type": "float", "low": 0.005, "high": 0.05, "log": True},
        },
        fixed={"epochs": 1},
        early_stopping=False,
    )
    runs = []
    for name in ("first", "second"):
        run_cli(
            [
                "sweep",
                "--space",
                str(space),
                "--name",
                name,
                "--data",
                str(data),
                "--results",
                str(tmp_path),
                "--max-concurrent",
                "1",
                "--seed",
                "7",
            ],
            tmp_path,
            300,
        )
        params = [(t.number, k, v) for t in load_study(tmp_path / name).trials for k, v in sorted(t.params.items())]
        trials = read_trials(tmp_path / name)
        metrics = trials.sort_values(["params_head_width", "params_lr"])[
            ["params_head_width", "params_lr", "val_accuracy", "test_accuracy"]
        ].reset_index(drop=True)
        runs.append((params, metrics))
    assert runs[0][0] == runs[1][0] and len(runs[0][0]) == 4  # 2 trials x 2 searched settings, in the same order
    pd.testing.assert_frame_equal(runs[0][1], runs[1][1])


GRACE_S = 20  # README: a sweep stops within this long of SIGTERM or Ctrl-C


@pytest.mark.slow
def test_sigterm_and_ctrl_c_stop_a_sweep_that_then_resumes_with_nothing_lost_or_run_twice(tmp_path, data):
    """Preemption as Slurm, Kubernetes and spot instances do it (SIGTERM, SIGKILL after a grace period), then Ctrl-C:
    each time the driver exits within the grace period, status 128 + the signal, naming the exact resume command."""
    space = write_space(
        tmp_path / "preempt.yaml",
        2,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": 3},
        early_stopping=False,
    )
    results = ["--results", str(tmp_path / "results")]
    folder = tmp_path / "results" / "preempt"
    for signum, command in (
        (signal.SIGTERM, ["sweep", "--space", str(space), "--data", str(data), "--max-concurrent", "1"]),
        (signal.SIGINT, ["resume", "preempt"]),
    ):
        rows = len(read(folder, "epochs"))
        with cli([*command, *results], cwd=tmp_path) as driver:
            wait_for(lambda: len(read(folder, "epochs")) > rows, 240, driver, "a new epoch")
            driver.send_signal(signum)
            try:
                out, _ = driver.communicate(timeout=GRACE_S)
            except subprocess.TimeoutExpired:
                pytest.fail(f"the driver was still running {GRACE_S} s after {signum.name}")  # cli() SIGKILLs it, as the scheduler would
        assert driver.returncode == 128 + signum, out[-3000:]
        last = out.strip().splitlines()[-1]
        assert last.startswith(f"asl-tune: stopped: sweep 'preempt' stopped by {signum.name}") and "Traceback" not in out, out[-3000:]
        assert f"`asl-tune resume preempt --results {tmp_path / 'results'}`" in last, last
        assert not [t for t in RAY_TABLES if t in out], out[-3000:]  # asl-tune's lines, not Ray's tables
    verbose = run_cli(["resume", "preempt", "--verbose", *results], tmp_path, 400)
    assert any(t in verbose for t in RAY_TABLES[:2]), verbose[-3000:]  # --verbose on resume brings Ray's tables back
    trials, epochs = assert_consistent(folder, 2)  # no trial lost or doubled; each trial's epochs 1..3 once each
    assert set(trials["status"]) == {"completed"} and len(epochs) == 2 * 3
