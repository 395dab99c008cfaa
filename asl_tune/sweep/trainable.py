"""One sweep trial inside a Ray worker: the shared trainer, fed from the object store, reporting to Tune.

This is the only place the trainer meets Ray. Each epoch's metrics go to `tune.report` with the
epoch's checkpoint, written into a fresh folder as Ray's own examples do; a trial Ray restarts (a
retry after a crash, or `asl-tune resume`) picks up from the newest checkpoint Ray kept, which
`tune.get_checkpoint()` hands back. That is the only one it restores: when it is unreadable, the
trial starts over (logged by train.load_checkpoint).
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import io
import logging
import math
import os
import platform
import resource
import shutil
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from asl_tune.sweep.handoff import SharedDataset
from asl_tune.sweep.space import SearchSpace

# A failing trial's own output travels to the driver after this line, as a note on its exception; the
# recorder writes it, with the traceback, to logs/<trial id>.log in the sweep folder.
TRIAL_OUTPUT = "---- the trial's own output (stdout, stderr, asl_tune log), last part ----"
OUTPUT_KEPT = 200_000  # characters of it

# What a trial's report holds, as the driver's callbacks (recorder.py, tracking.py) receive it from Tune. The key of
# the report's own epochs.parquet row (train.EPOCH_ROW, named here so that the driver never imports torch); the
# rest of a report is the trial's metrics so far, its trials.parquet row: one meaning per name in each file.
EPOCH_ROW = "epoch_row"
NOT_TRIAL_COLUMNS = (EPOCH_ROW, "confusion", "per_class")  # nested parts of a report, stored in files of their own
# What Tune itself puts in a result (ray.tune.result.AUTO_RESULT_KEYS and its bookkeeping), apart from the trial's metrics.
TUNE_KEYS = frozenset(
    {
        "training_iteration",
        "time_total_s",
        "episodes_total",
        "timesteps_total",
        "node_ip",
        "hostname",
        "pid",
        "time_this_iter_s",
        "timestamp",
        "date",
        "time_since_restore",
        "timesteps_since_restore",
        "iterations_since_restore",
        "config",
        "checkpoint_dir_name",
        "done",
        "trial_id",
        "experiment_tag",
        "should_checkpoint",
    }
)

# Fault drills (tests, chaos runs): "raise@<epoch>" makes every trial raise once it has reported that epoch;
# "raise@<epoch>:<setting>=<value>" only the trials with that setting, e.g. "raise@1:head_width=16". "hold@<epoch>"
# (with a setting too) makes them wait there instead, until killed: a test then kills the sweep at the moment it chose.
FAULT_ENV = "ASL_TUNE_FAULT"

WORK_PREFIX = "asl-tune-trial."  # + "<host>.<pid>.": each trial's scratch folder in the system temp folder


def warm_up() -> None:
    """Ray's worker_process_setup_hook (cluster.py): import the trainer, and with it torch, as each worker starts.

    Workers start with Ray, so the seconds torch takes to import pass while the driver is still
    setting up the sweep, not when the first trial begins.
    """
    importlib.import_module("asl_tune.train")


def searcher_value(value, mode: str) -> float:
    """A metric as the searcher and scheduler may see it: a diverged trial's NaN becomes the worst value.

    (Optuna leaves a trial whose objective is NaN running forever; -inf for max, +inf for min, ranks it last.)
    """
    if isinstance(value, (int, float)) and math.isfinite(value):
        return value
    return -math.inf if mode == "max" else math.inf


def run_trial(
    config: dict, space: SearchSpace, datasets: dict[int, SharedDataset], externals: dict[int, SharedDataset] | None = None
) -> None:
    """Ray Tune's function trainable: train space.config(config) on the shared decoded arrays.

    Long: the trial's life in one place: restore, scratch folder, the report callback Tune needs, the trainer, the output kept on failure.
    """
    import ray
    import torch
    from ray import tune

    from asl_tune.train import load_checkpoint, pick_device, save_checkpoint, train_trial

    trial_config = space.config(config)
    dataset = datasets[trial_config.image_size].open()  # this node's one copy, read-only: the cache file or the object store (handoff.py)
    external = externals[trial_config.image_size].open() if externals else None
    resources = ray.get_runtime_context().get_assigned_resources()
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    device = pick_device() if gpus else torch.device("cpu")  # a trial Ray gave no GPU keeps off any it can see
    where = {"node_id": ray.get_runtime_context().get_node_id(), "hostname": platform.node()}
    fault = _fault(trial_config)

    restored = None
    if (checkpoint := tune.get_checkpoint()) is not None:
        with checkpoint.as_directory() as folder:  # local storage: the folder itself; else a copy, removed after
            restored = load_checkpoint(Path(folder))

    _reap_work_folders()
    # The folders each report's checkpoint is written into live here, named for this worker, so that what a
    # SIGKILLed worker leaves mid-report (tens of MB) is found and removed by the next trial on this host.
    work = Path(tempfile.mkdtemp(prefix=_work_prefix(os.getpid())))
    try:
        private_mb: list[float] = []  # sampled at each report: after an epoch's validation, and after the test split

        def report(metrics: dict, state: dict | None) -> None:
            epoch = metrics[EPOCH_ROW]["epoch"]
            private_mb.append(_private_mb())
            out = {**metrics, **where, "peak_rss_mb": _peak_rss_mb(), "peak_private_mb": max(private_mb)}
            for metric, mode in {(space.metric, space.mode), *space.objectives}:
                out[metric] = searcher_value(out.get(metric), mode)
            if state is None:
                tune.report(out)
            else:
                # A fresh folder per report; Tune copies it into the trial's storage before report returns.
                with tempfile.TemporaryDirectory(dir=work) as folder:
                    save_checkpoint(Path(folder), state)
                    tune.report(out, checkpoint=tune.Checkpoint.from_directory(folder))
            if fault is not None and epoch >= fault[1]:
                if fault[0] == "hold":
                    threading.Event().wait()  # Tune has this report; the trial goes no further until the drill's test kills it
                raise RuntimeError(f"fault drill: {FAULT_ENV} asked this trial to fail after epoch {epoch}")

        with _output_kept() as output:
            try:
                train_trial(
                    trial_config,
                    dataset,
                    external,
                    report=report,
                    resume=restored,
                    threads=max(1, int(cpus)),
                    device=device,
                    gpu_share=min(gpus, 1.0) or 1.0,
                )
            except Exception as e:
                # The traceback reaches the driver (Ray's error file); the output only does when it travels with it.
                e.add_note(f"{TRIAL_OUTPUT}\n{output.getvalue()[-OUTPUT_KEPT:]}")
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _output_kept() -> Iterator[io.StringIO]:
    """The trial's stdout, stderr and asl_tune log records, copied into a buffer while they still go where they went."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package = logging.getLogger("asl_tune")
    level = package.level
    package.addHandler(handler)
    package.setLevel(logging.INFO)
    try:
        with contextlib.redirect_stdout(_Tee(sys.stdout, buffer)), contextlib.redirect_stderr(_Tee(sys.stderr, buffer)):
            yield buffer
    finally:
        package.removeHandler(handler)
        package.setLevel(level)


class _Tee(io.TextIOBase):
    """A text stream that writes to two others."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def write(self, text: str) -> int:
        self.second.write(text)
        return self.first.write(text)

    def flush(self) -> None:
        self.first.flush()


def _work_prefix(pid: int) -> str:
    """A trial's scratch folder is named for its host and worker process, so a later trial can tell when it is orphaned."""
    return f"{_host_prefix()}{pid}."


def _host_prefix() -> str:
    return f"{WORK_PREFIX}{platform.node()}."


def _reap_work_folders() -> None:
    """Delete the scratch folders (a checkpoint on its way to Tune, tens of MB) of this host's trial workers that have died.

    A worker removes its trial's folder itself; one that was SIGKILLed (a crash, a killed driver taking its
    workers with it, a lost node) cannot, and the retried or resumed trial starts here in a new worker.
    A process that exists, or that this user may not signal, counts as alive.
    """
    host = _host_prefix()
    for folder in Path(tempfile.gettempdir()).glob(glob.escape(host) + "*"):
        pid = folder.name[len(host) :].partition(".")[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except OSError:
            continue


def _peak_rss_mb() -> float:
    """This worker process's peak resident memory so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _private_mb() -> float:
    """This worker's anonymous memory now, in MB (smaps_rollup's Anonymous: its heap, tensors and copies, which no file backs).

    It is what one more trial on a node costs. The dataset is not in it: its pages are the cache file's (the page
    cache, reclaimable, shared by every trial that reads them) or Ray's shared object store. USS would count a
    file page that only this trial has read yet as private, so it grows with what the trial read, not with what
    it holds. NaN where the kernel does not say (not Linux).
    """
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return math.nan
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith("Anonymous:")) / 1000


def _fault(trial_config) -> tuple[str, int] | None:
    """The fault drill asked of this trial: ("raise" or "hold", the epoch after which), or None (the normal case)."""
    action, _, spec = os.environ.get(FAULT_ENV, "").partition("@")
    if action not in ("raise", "hold") or not spec:
        return None
    epoch, _, where = spec.partition(":")
    if where:
        key, _, value = where.partition("=")
        if str(getattr(trial_config, key, None)) != value:
            return None
    return action, int(epoch)
