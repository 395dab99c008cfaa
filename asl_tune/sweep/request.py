"""What a sweep was asked to do, and where it lives: the request and its checks, sweep.json, the folder lock.

A sweep lives in one folder, `<results>/<name>/`:

    sweep.json      what was asked: space, data, resources, and one entry per run (first, extensions)
    space.yaml      the search space, copied, so the sweep can be resumed or extended as it began
    study.log       the Optuna study (Optuna's journal; study.db, SQLite, in sweeps made before it): the
                    searcher's memory, shared by every run
    ray/run-<k>/    Ray Tune's experiment state and trial checkpoints for run k
    *.parquet       the results (see results.py), written as they arrive
    logs/<trial>.log  a failed trial's settings, traceback and own output (stdout, stderr, asl_tune log)
    .lock           held (flock) by the one driver running the sweep

`<results>` may also be a URI (s3://, gs://, file:///...): the sweep then runs in a local working copy
of that folder and its small files are copied to `<URI>/<name>/` as they change, while Ray keeps its
runs at `<URI>/<name>/run-<k>/`. Either way the sweep code holds one `mirror.SweepFolder` (see `place`).

Everything a user can get wrong is checked here, before the folder is created, any data is decoded,
or Ray is started.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically
from asl_tune.results import RESULT_FILES, is_plain_name
from asl_tune.sweep import cluster
from asl_tune.sweep.mirror import SweepFolder, is_uri, open_uri, sweep_folder
from asl_tune.sweep.mirror import join as join_uri
from asl_tune.sweep.space import SearchSpace, load_space

SWEEP_FILE = "sweep.json"
SPACE_FILE = "space.yaml"
STUDY_FILE = "study.log"  # the Optuna study, Optuna's journal (see study.py)
LEGACY_STUDY_FILE = "study.db"  # the study of a sweep made before study.log (SQLite): read and written as it is
RAY_DIR = "ray"
LOCK_FILE = ".lock"
LOGS_DIR = "logs"
MIRRORED = (SWEEP_FILE, SPACE_FILE, STUDY_FILE, LEGACY_STUDY_FILE, *RESULT_FILES)  # what a sweep at a URI copies there (not .lock)


def study_file(folder: Path) -> str:
    """The file that holds a sweep folder's study: study.db in a sweep made before study.log, else study.log."""
    old, new = Path(folder) / LEGACY_STUDY_FILE, Path(folder) / STUDY_FILE
    return LEGACY_STUDY_FILE if old.exists() and not new.exists() else STUDY_FILE


@dataclass
class SweepRequest:
    """What `asl-tune sweep` was asked to do, validated by `check_request`."""

    space_path: Path
    data: Path | None = None  # None: the embedded synthetic dataset
    external: Path | None = None
    name: str | None = None  # default: the space's name
    results: Path | str = Path("results")  # a folder, or a URI as a str (a Path would fold its "//")
    num_samples: int | None = None  # default: the space's
    max_concurrent: int | None = None
    cpus_per_trial: float = 1.0
    gpus_per_trial: float | None = None  # default: 1 when the cluster has GPUs, else 0
    address: str | None = None
    storage: str | None = None  # Ray checkpoint storage URI (s3://, gs://); default: the sweep folder, or a URI --results
    seed: int = 0
    extend: bool = False
    dashboard: bool = False
    verbose: bool = False  # Ray Tune's own tables instead of asl-tune's status line
    tensorboard: bool = False  # each trial's epochs as TensorBoard event files under the sweep folder
    mlflow: str | None = None  # an MLflow tracking URI: each trial as a run there
    ship_code: bool = True  # with --address: send this asl_tune package to the cluster's workers (runtime_env py_modules)


@dataclass
class SweepState:
    """sweep.json: enough to resume or extend a sweep from its folder alone."""

    name: str
    data: str
    external: str | None
    cpus_per_trial: float
    gpus_per_trial: float | None
    max_concurrent: int | None
    seed: int
    address: str | None
    runs: list[dict] = field(default_factory=list)  # {"dir", "num_samples", "started", "finished", "errored": [trial ids]}
    storage: str | None = None  # where Ray keeps checkpoints (a URI such as s3://...), else the sweep folder
    tensorboard: bool = False  # trackers the sweep logs to (--tensorboard, --mlflow): kept for resume and --extend
    mlflow: str | None = None

    def resumable(self) -> bool:
        """Whether `resume` has work: the last run did not finish, or it finished with errored trials, which resume runs
        again from their last checkpoints (a worker killed for memory, a lost node, a bug since fixed)."""
        return bool(self.runs) and (not self.runs[-1]["finished"] or bool(self.runs[-1].get("errored")))

    def ray_root(self, folder: Path) -> str:
        """The folder or URI that holds this sweep's Ray runs."""
        return join_uri(self.storage, self.name) if self.storage else str((folder / RAY_DIR).resolve())

    def run_path(self, folder: Path, run: dict) -> str:
        """Where Ray keeps one run's experiment state and checkpoints."""
        return f"{self.ray_root(folder)}/{Path(run['dir']).name}"

    @classmethod
    def read(cls, folder: Path, shown: str | None = None) -> "SweepState":
        try:
            return cls(**json.loads((folder / SWEEP_FILE).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise AslTuneError(f"{shown or folder / SWEEP_FILE}: unreadable sweep record ({e})") from None

    def write(self, folder: Path) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        write_atomically(folder / SWEEP_FILE, lambda tmp: tmp.write_text(text))


def _positive(option: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    if isinstance(value, int) and abs(value) > sys.float_info.max:  # 10**400: math.isfinite cannot even take it
        raise AslTuneError(f"{option}: must be a finite number, got {value}")
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise AslTuneError(f"{option}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class Checked(NamedTuple):
    """A validated request: the space, the sweep's name, its folder (local, or a working copy of one at a URI), and its state (--extend)."""

    space: SearchSpace
    name: str
    sweep: SweepFolder
    state: SweepState | None


def place(results: Path | str, name: str) -> SweepFolder:
    """The sweep's folder: `<results>/<name>/`, or for results at a URI a working copy that copies the sweep's files there."""
    return sweep_folder(results, name, MIRRORED)


def check_request(req: SweepRequest) -> Checked:
    """Validate everything that needs no data and no cluster; nothing is created."""
    _positive("--num-samples", req.num_samples)
    if req.num_samples is not None and int(req.num_samples) != req.num_samples:
        raise AslTuneError(f"--num-samples: must be a whole number, got {req.num_samples}")
    _positive("--max-concurrent", req.max_concurrent)
    _positive("--cpus-per-trial", req.cpus_per_trial)
    _positive("--gpus-per-trial", req.gpus_per_trial, allow_zero=True)
    if req.gpus_per_trial and req.gpus_per_trial > 1 and int(req.gpus_per_trial) != req.gpus_per_trial:
        raise AslTuneError(f"--gpus-per-trial: above 1 must be a whole number of GPUs, got {req.gpus_per_trial}")
    if req.seed < 0:
        raise AslTuneError(f"--seed: must be >= 0, got {req.seed}")
    if req.address:
        cluster.check_reachable(req.address)  # before any decoding: a dead address fails in seconds
    if not req.ship_code and not req.address:
        raise AslTuneError(
            "--no-ship-code: applies with --address only (a local Ray runs this machine's asl_tune), got it without --address"
        )
    if req.storage is not None and "://" not in req.storage:
        raise AslTuneError(
            f"--storage: must be a URI Ray's storage supports, such as s3://bucket/path or gs://bucket/path, got {req.storage!r}"
        )
    if is_uri(req.results):
        open_uri(str(req.results))  # refuses a scheme pyarrow cannot open
    space = None if req.extend and req.name else load_space(req.space_path)  # extending keeps the sweep's own space
    name = req.name or space.name
    if not is_plain_name(name):
        raise AslTuneError(f"--name: must be a plain folder name, got {name!r}")
    sweep = place(req.results, name)
    with sweep.peek((SWEEP_FILE, SPACE_FILE)) as (where, shown):  # read before the lock is held
        exists = (where / SWEEP_FILE).exists()
        if space is None:
            space = load_space(where / SPACE_FILE) if (where / SPACE_FILE).is_file() else load_space(req.space_path)
        if exists and not req.extend:
            raise AslTuneError(
                f"--name: a sweep named {name!r} already exists in {shown}; add --extend to add trials to it, "
                f"or run `asl-tune resume {name}{sweep.results_flag}` to finish an interrupted one"
            )
        if req.extend and not exists:
            raise AslTuneError(f"--extend: there is no sweep named {name!r} in {req.results} to extend")
        state = SweepState.read(where, f"{shown}/{SWEEP_FILE}") if req.extend else None
    if state is not None and state.runs and not state.runs[-1]["finished"]:
        if sweep.path.is_dir():
            with exclusive(sweep.path, name):  # refused here when another driver is running it now
                pass
        raise AslTuneError(f"--extend: the last run of {name!r} did not finish; run `asl-tune resume {name}{sweep.results_flag}` first")
    for folder, refusal in sweep.writable_places():
        _check_writable(folder, refusal)
    image_sizes(space)  # refuses a searched image_size that is not categorical
    if req.mlflow:  # last: it may create the sweep's MLflow experiment
        from asl_tune.sweep.tracking import check_mlflow

        check_mlflow(req.mlflow, name)
    return Checked(space, name, sweep, state)


def _check_writable(results: Path, what: str = "--results: cannot write to") -> None:
    """Refuse a --results folder that cannot be created or written, before anything is made."""
    probe_root = results
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir() or not os.access(probe_root, os.W_OK | os.X_OK):
        raise AslTuneError(f"{what} {results} ({probe_root} is not a writable folder)")


def image_sizes(space: SearchSpace) -> list[int]:
    """Every image size a trial may ask for: each is decoded once and shared."""
    if "image_size" in space.params:
        p = space.params["image_size"]
        if p.type != "categorical":
            raise AslTuneError(
                f"{space.source}: params.image_size: must be categorical (each size is decoded once for the whole sweep), got type {p.type}"
            )
        return sorted(set(p.choices))
    return [int(space.fixed.get("image_size", 200))]


@contextmanager
def exclusive(folder: Path, name: str) -> Iterator[None]:
    """Hold the sweep's lock while its driver runs: a second driver on the same sweep is refused, not merged.

    The lock is an flock on a file in the folder, so the kernel releases it when the holder dies, even by SIGKILL.
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AslTuneError(
                f"--name: sweep {name!r} in {folder} is being run by another asl-tune process right now; wait for it, or stop it first"
            ) from None
        yield
    finally:
        os.close(fd)


class NothingToResume(Exception):
    """`asl-tune resume` of a sweep whose every run finished, no trial errored. Not an error: a retry loop, or a requeued Slurm job,
    runs `resume` whatever became of the last driver, which may have been killed after the sweep finished. The
    command says so (the message, one line) and succeeds, running and changing nothing (api.resume)."""

    def __init__(self, name: str, sweep: SweepFolder, state: SweepState):
        total = sum(run["num_samples"] for run in state.runs)
        super().__init__(
            f"sweep {name!r} has nothing to resume: all {total} trials finished; "
            f"add trials with `asl-tune sweep --name {name} --extend --num-samples K{sweep.results_flag}`"
        )
        self.folder = sweep.path


class Resumable(NamedTuple):
    """A sweep `asl-tune resume` may continue: its space, folder, state as last read, and Ray address."""

    space: SearchSpace
    sweep: SweepFolder
    state: SweepState
    address: str | None


def check_resume(name: str, results: Path | str, address: str | None) -> Resumable:
    """Validate `asl-tune resume NAME`: the sweep exists and has work (SweepState.resumable, else NothingToResume); nothing is created."""
    if is_uri(results):
        open_uri(str(results))  # refuses a scheme pyarrow cannot open
    if not is_plain_name(name):
        raise AslTuneError(f"NAME: must be a plain folder name, got {name!r}")
    sweep = place(results, name)
    with sweep.peek((SWEEP_FILE, SPACE_FILE)) as (where, shown):  # read before the lock is held
        if not (where / SWEEP_FILE).exists():
            raise AslTuneError(f"NAME: no sweep named {name!r} in {results} (no {shown}/{SWEEP_FILE})")
        state = SweepState.read(where, f"{shown}/{SWEEP_FILE}")
        if not state.runs:
            raise AslTuneError(f"NAME: sweep {name!r} has nothing to resume: {shown}/{SWEEP_FILE} records no run")
        if not state.resumable():
            raise NothingToResume(name, sweep, state)
        space = load_space(where / SPACE_FILE)
    address = address or state.address
    if address:
        cluster.parse_address(address)
    return Resumable(space, sweep, state, address)
