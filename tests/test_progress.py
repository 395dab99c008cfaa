"""What a user sees while work runs: one line per trial event and a compact status line; on a terminal the
status line is rewritten in place, in a log or a pipe it is plain lines with no carriage returns; `--verbose`
brings back Ray Tune's tables. Checked on real sweeps, piped and under a pseudo-terminal."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_dataset
from sweeps import RAY_TABLES, run_cli, write_space

from asl_tune.synth import render_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("progress") / "data", per_class=8)


def tiny(path: Path, trials: int, epochs: int = 1, early_stopping: bool | dict = False) -> Path:
    return write_space(
        path,
        trials,
        params={"head_width": {"type": "categorical", "choices": [16, 32]}},
        fixed={"epochs": epochs},
        early_stopping=early_stopping,
    )


@pytest.mark.slow
def test_a_piped_sweep_prints_its_events_and_status_in_plain_lines_and_verbose_brings_back_rays_tables(tmp_path, data):
    space = tiny(
        tmp_path / "piped.yaml", 2, epochs=2, early_stopping={"reduction_factor": 2, "grace_epochs": 1}
    )  # ASHA: a rung after epoch 1
    results = ["--results", str(tmp_path / "results")]
    out = run_cli(["sweep", "--space", str(space), "--data", str(data), *results], tmp_path, 300)
    assert "\r" not in out and not [t for t in RAY_TABLES if t in out], out
    started = re.findall(r"^trial (\w+) started \(head \d+", out, re.M)
    ended = dict(
        (tid, (k, how)) for k, tid, how in re.findall(r"^\[(\d)/2\] trial (\w+) (completed|stopped early): val_accuracy", out, re.M)
    )
    assert len(started) == 2 and sorted(ended) == sorted(started) and sorted(k for k, _ in ended.values()) == ["1", "2"], out
    # Each trial's rung decision, once: the first to reach the rung goes on; the other is judged against it.
    rungs = re.findall(
        r"^trial (\w+) at rung 1 \(1 epoch of images\): val_accuracy [\d.]+, (the first to reach it|cutoff [\d.]+ over 1 trial): (continues|stopped)$",
        out,
        re.M,
    )
    assert sorted(tid for tid, _, _ in rungs) == sorted(started) and sorted(judged[:3] for _, judged, _ in rungs) == ["cut", "the"], out
    assert all((decision == "stopped") == (ended[tid][1] == "stopped early") for tid, _, decision in rungs), out
    # TensorBoard and MLflow are off unless asked for: no event files, no tracker in the sweep's record.
    state = json.loads((tmp_path / "results" / "piped" / "sweep.json").read_text())
    assert (state["tensorboard"], state["mlflow"]) == (False, None) and not (tmp_path / "results" / "piped" / "tensorboard").exists()
    assert re.search(r"^sweep: 2/2 done, 0 running, 0 pending; best val_accuracy [\d.]+ \(\w+\); \d+m\d\ds elapsed$", out, re.M), out
    assert len(out.strip().splitlines()) < 25, out  # about 500 lines for 8 trials before

    verbose = run_cli(["sweep", "--name", "piped", "--extend", "--num-samples", "1", "--verbose", *results], tmp_path, 300)
    assert any(t in verbose for t in RAY_TABLES[:2]), verbose
    assert not re.search(r"^sweep: \d+/\d+ done", verbose, re.M), verbose  # Ray's tables instead of ours


@pytest.mark.slow
def test_on_a_terminal_the_status_line_is_rewritten_in_place(tmp_path, data):
    space = tiny(tmp_path / "tty.yaml", 1)
    command = [
        sys.executable,
        "-m",
        "asl_tune",
        "sweep",
        "--space",
        str(space),
        "--data",
        str(data),
        "--results",
        str(tmp_path / "results"),
    ]
    master, slave = pty.openpty()
    proc = subprocess.Popen(command, cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave, close_fds=True)
    os.close(slave)
    seen = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        seen += chunk
    os.close(master)
    assert proc.wait(timeout=300) == 0, seen.decode(errors="replace")[-3000:]
    text = seen.decode(errors="replace").replace("\r\n", "\n")  # the terminal's own line ends
    redraws = re.findall(r"\rsweep: \d/1 done", text)
    assert len(redraws) >= 2, text[-3000:]  # the status line, drawn again in place
    assert "[1/1] trial" in text and "sweep 'tiny' done" not in text and "sweep 'tty' done: 1 trials (1 completed)" in text


def test_the_renderers_progress_in_a_log_is_plain_short_lines(tmp_path, capfd):
    render_dataset(tmp_path / "synth", per_class=1, seed=0, image_px=32, progress=True)
    err = capfd.readouterr().err
    assert "rendering synthetic ASL dataset" in err and "\r" not in err
    assert max(len(line) for line in err.splitlines()) < 120, err
