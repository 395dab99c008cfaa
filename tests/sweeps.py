"""Helpers for tests that run real sweeps: tiny spaces, the CLI as a child process, killing it and its Ray."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import yaml

from asl_tune.results import read_snapshot

TINY_FIXED = {"image_size": 32, "batch_size": 16, "momentum": 0.9}


def write_space(path: Path, num_samples: int, params: dict, fixed: dict | None = None, **extra) -> Path:
    """A search-space YAML file for a tiny sweep."""
    doc = {"name": path.stem, "metric": "val_accuracy", "mode": "max", "num_samples": num_samples, "fixed": {**TINY_FIXED, **(fixed or {})}, "params": params, **extra}
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def start_cli(args: list[str], cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`asl-tune ARGS` in its own process group, so the test can kill it and every Ray process it started."""
    return subprocess.Popen(
        [sys.executable, "-m", "asl_tune", *args], cwd=cwd, env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver, then whatever Ray processes it left in its process group."""
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    time.sleep(1)


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


def read(folder: Path, name: str) -> pd.DataFrame:
    """One results file as it stands, read as a whole snapshot even while the sweep rewrites it."""
    path = folder / f"{name}.parquet"
    return read_snapshot(path) if path.exists() else pd.DataFrame(columns=["trial_id", "epoch", "status"])


def run_to_end(proc: subprocess.Popen, timeout: float) -> str:
    """Wait for the child; return its output, failing with it when the exit status is not 0."""
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


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
