"""The Python API from every place a user calls it: a script with no `if __name__ == "__main__":` guard,
code piped into `python -`, `python -c`, `python -m` and an in-process (notebook-like) call.

multiprocessing's spawn workers re-ran the caller's main module, so the first two never ended (their pools
replaced each dying worker forever). Each case renders a tiny synthetic dataset and decodes it with two
workers, through the worker processes of both (asl_tune.workers); a hang fails through the child's timeout.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from sweeps import write_space

from asl_tune import data, synth

CLASSES = ["A", "B", "C", "V"]
PER_CLASS = 17  # 68 training images: two decode tasks of data.DECODE_CHUNK, so the decode runs in workers
CHILD_TIMEOUT_S = 180  # seconds for a child that takes a few on a quiet machine; only a hang reaches it

PROGRAM = """
import asl_tune.data, asl_tune.synth
folder = asl_tune.synth.render_dataset({out!r}, per_class={per_class}, image_px=48, progress=False, classes={classes!r})
ds = asl_tune.data.load_dataset(folder, 32, progress=False, workers=2)
print(len(ds.labels), ds.images.shape[1], len(ds.skipped), int(ds.images.max()))
"""


def program(out: Path) -> str:
    """The tiny render-and-decode, as top-level code with no main guard."""
    return PROGRAM.format(out=str(out), per_class=PER_CLASS, classes=CLASSES)


def run_python(args: list[str], cwd: Path, stdin: str | None = None, timeout: float = CHILD_TIMEOUT_S) -> tuple[str, str]:
    """`python ARGS` to its end in its own process group; a child still running at the timeout fails the test, its group killed."""
    proc = subprocess.Popen(
        [sys.executable, *args],
        cwd=cwd,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"python {' '.join(args)[:60]} still ran after {timeout:.0f} s (a hang); its stderr ends:\n{err[-3000:]}")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # any worker it left behind
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return out, err


def test_the_cases_use_the_worker_processes():
    assert synth.RENDER_WORKERS > 1 and len(CLASSES) * PER_CLASS > data.DECODE_CHUNK


@pytest.mark.parametrize("how", ["script without a guard", "python -", "python -c", "python -m"])
def test_a_render_and_a_decode_end_from_any_main(how, tmp_path):
    code = program(tmp_path / "synth")
    (tmp_path / "noguard.py").write_text(code)
    args, stdin = {
        "script without a guard": (["noguard.py"], None),
        "python -": (["-"], code),
        "python -c": (["-c", code], None),
        "python -m": (["-m", "noguard"], None),
    }[how]
    out, _ = run_python(args, tmp_path, stdin)
    n, size, skipped, brightest = out.split()
    assert (int(n), int(size), int(skipped)) == (len(CLASSES) * PER_CLASS, 32, 0) and int(brightest) > 0


@pytest.mark.timeout(CHILD_TIMEOUT_S)
def test_a_render_and_a_decode_end_in_process_with_the_pixels_of_one_process(tmp_path, monkeypatch):
    """A notebook's kernel is a main module with its own guard: the call runs in this process, as there."""
    folder = synth.render_dataset(tmp_path / "synth", per_class=PER_CLASS, image_px=48, progress=False, classes=CLASSES)
    ds = data.load_dataset(folder, 32, progress=False, workers=2)
    monkeypatch.setenv("ASL_TUNE_CACHE", str(tmp_path / "another-cache"))
    alone = data.load_dataset(folder, 32, progress=False, workers=1)  # decoded again, in this process
    assert len(ds.labels) == len(CLASSES) * PER_CLASS and not ds.skipped and ds.images.max() > 0
    assert (ds.images == alone.images).all() and ds.paths == alone.paths


@pytest.mark.slow
def test_a_sweep_ends_from_a_script_without_a_guard(tmp_path):
    space = write_space(
        tmp_path / "tiny.yaml",
        1,
        params={"head_width": {"type": "categorical", "choices": [16, 24]}},
        fixed={"epochs": 1},
        early_stopping=False,
    )
    (tmp_path / "noguard.py").write_text(
        program(tmp_path / "synth")
        + f"""
import asl_tune
run = asl_tune.sweep(space={str(space)!r}, data=folder, results={str(tmp_path / "results")!r}, name="script")
print(list(asl_tune.load(run.name, results=run.results).trials["status"]))
"""
    )
    out, _ = run_python(["noguard.py"], tmp_path, timeout=300)
    assert out.splitlines()[-1] == "['completed']"
