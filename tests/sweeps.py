"""Helpers for tests that run real sweeps: tiny spaces, the CLI as a child process, killing it and its Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pandas as pd
import yaml

from asl_tune.results import read_confusion, read_epochs, read_trials

RAY_TABLES = ("Trial status", "Configuration for experiment", "╭", "│")  # Ray Tune's own output, shown only with --verbose
TINY_FIXED = {"image_size": 32, "batch_size": 16, "momentum": 0.9}


def write_space(path: Path, num_samples: int, params: dict, fixed: dict | None = None, **extra) -> Path:
    """A search-space YAML file for a tiny sweep."""
    doc = {
        "name": path.stem,
        "metric": "val_accuracy",
        "mode": "max",
        "num_samples": num_samples,
        "fixed": {**TINY_FIXED, **(fixed or {})},
        "params": params,
        **extra,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`asl-tune ARGS` in its own process group, so the test can kill it and every Ray process it started."""
    return subprocess.Popen(
        [sys.executable, "-m", "asl_tune", *args],
        cwd=cwd,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


@contextmanager
def cli(args: list[str], cwd: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """`asl-tune ARGS` as a child for the block; after it, however the block ends, the child and its Ray are gone."""
    proc = start_cli(args, cwd, env)
    try:
        yield proc
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever Ray processes it left in its process group; return once all are gone."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    raise AssertionError(f"processes of group {proc.pid} outlived SIGKILL for 30 s")


def wait_for_saved_state(run: Path, since: float, timeout: float = 60, proc: subprocess.Popen | None = None) -> None:
    """Wait until Tune has saved its experiment state in run (a run-K folder) after `since` (time.time())."""

    def saved() -> bool:
        return any(p.stat().st_mtime > since for p in Path(run).glob("experiment_state-*.json"))

    wait_for(saved, timeout, proc, f"Tune to save its state in {run}")


def wait_for(predicate, timeout: float, proc: subprocess.Popen | None = None, what: str = "condition") -> None:
    """Poll predicate until true; fail with the child's output if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the sweep exited (rc {proc.returncode}) before {what}:\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.3)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def load_study(folder: Path, name: str | None = None):
    """A sweep folder's Optuna study (its name: the sweep's), read through Optuna's own journal backend, as
    optuna-dashboard opens study.log; also how a test writes to it, as a driver killed mid-write would have."""
    import optuna

    path = Path(folder) / "study.log"
    assert path.is_file(), f"{path}: no study"
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(path)))
    return optuna.load_study(study_name=name or Path(folder).name, storage=storage)


def study_states(folder: Path) -> tuple[int, set[str]]:
    """How many trials a sweep folder's study has, and their states' names."""
    trials = load_study(folder).get_trials(deepcopy=False)
    return len(trials), {t.state.name for t in trials}


def read(folder: Path, name: str) -> pd.DataFrame:
    """One results file as it stands, read as a whole snapshot even while the sweep rewrites it."""
    readers = {"trials": read_trials, "epochs": read_epochs, "confusion": read_confusion}
    return readers[name](folder) if (folder / f"{name}.parquet").exists() else pd.DataFrame(columns=["trial_id", "epoch", "status"])


def run_to_end(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for the child; return its output, failing with it when the exit status is not 0."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def run_cli(args: list[str], cwd: Path, timeout: float, env: dict | None = None) -> str:
    """`asl-tune ARGS` to the end (exit 0), its process group gone afterwards; return its output."""
    with cli(args, cwd, env) as proc:
        return run_to_end(proc, timeout)


def assert_consistent(folder: Path, n_trials: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Exactly n trials, none running, no duplicate rows, and every trial's epochs 1..k with none missing."""
    trials, epochs = read(folder, "trials"), read(folder, "epochs")
    assert len(trials) == n_trials and trials["trial_id"].is_unique, trials[["trial_id", "status"]]
    assert "running" not in set(trials["status"]), trials[["trial_id", "status"]]
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for tid, group in epochs.groupby("trial_id"):
        assert list(group["epoch"]) == list(range(1, len(group) + 1)), (tid, list(group["epoch"]))
        assert group["images_seen"].is_monotonic_increasing
    assert set(epochs["trial_id"]) <= set(trials["trial_id"])
    return trials, epochs
