"""Sweeps: Optuna proposes settings, Ray Tune runs and early-stops the trials, Parquet keeps the results.

A sweep lives in one folder, `<results>/<name>/`:

    sweep.json      what was asked: space, data, resources, and one entry per run (first, extensions)
    space.yaml      the search space, copied, so the sweep can be resumed or extended as it began
    study.db        the Optuna study (SQLite): the searcher's memory, shared by every run
    ray/run-<k>/    Ray Tune's experiment state and trial checkpoints for run k
    *.parquet       the results (see results.py), written as they arrive

`<results>` may also be a URI (s3://, gs://, file:///...): the sweep then runs in a local working copy
of that folder and its small files are copied to `<URI>/<name>/` as they change, while Ray keeps its
runs at `<URI>/<name>/run-<k>/` (see remote.py).

Everything a user can get wrong is checked before the folder is created.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

from asl_tune import cluster, remote
from asl_tune.data import DecodedDataset, load_dataset, load_external, make_splits
from asl_tune.errors import AslTuneError
from asl_tune.remote import Mirror
from asl_tune.results import FINISHED, RESULT_FILES, is_plain_name, read_trials
from asl_tune.space import SearchSpace, load_space

log = logging.getLogger(__name__)

SWEEP_FILE = "sweep.json"
SPACE_FILE = "space.yaml"
STUDY_FILE = "study.db"
RAY_DIR = "ray"
LOCK_FILE = ".lock"
MIRRORED = (SWEEP_FILE, SPACE_FILE, STUDY_FILE, *RESULT_FILES)  # what a sweep at a URI copies there (not .lock)
MAX_FAILURES = 2  # an errored trial is retried from its last checkpoint this many times


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
    runs: list[dict] = field(default_factory=list)  # {"dir", "num_samples", "started", "finished"}
    storage: str | None = None  # where Ray keeps checkpoints (a URI such as s3://...), else the sweep folder

    def ray_root(self, folder: Path) -> str:
        """The folder or URI that holds this sweep's Ray runs."""
        return remote.join(self.storage, self.name) if self.storage else str((folder / RAY_DIR).resolve())

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
        tmp = folder / f".{SWEEP_FILE}.tmp"
        tmp.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(tmp, folder / SWEEP_FILE)


def _positive(option: str, value, allow_zero: bool = False) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        raise AslTuneError(f"{option}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


class Checked(NamedTuple):
    """A validated request: the space, the sweep's name, its local folder, its mirror (results at a URI), and its state (--extend)."""

    space: SearchSpace
    name: str
    folder: Path
    mirror: Mirror | None
    state: SweepState | None


def _place(results: Path | str, name: str) -> tuple[Path, Mirror | None]:
    """The sweep's local folder, and for results at a URI the mirror that copies it there."""
    if remote.is_uri(results):
        mirror = Mirror(str(results), name, MIRRORED)
        return mirror.folder, mirror
    return Path(results) / name, None


@contextmanager
def _peek(folder: Path, mirror: Mirror | None) -> Iterator[tuple[Path, str]]:
    """Where to read sweep.json and space.yaml before the sweep's lock is held, and how to name that place.

    A folder is read where it is; from a URI the two files are copied to a temporary folder, so that
    nothing is written to the staging folder before the lock is held (nor when the request is refused).
    """
    if mirror is None:
        yield folder, str(folder)
        return
    with tempfile.TemporaryDirectory(prefix="asl-tune-peek-") as tmp:
        mirror.fetch([SWEEP_FILE, SPACE_FILE], Path(tmp))
        yield Path(tmp), mirror.remote


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
    if req.storage is not None and "://" not in req.storage:
        raise AslTuneError(f"--storage: must be a URI Ray's storage supports, such as s3://bucket/path or gs://bucket/path, got {req.storage!r}")
    uri_fs = remote.open_uri(str(req.results)) if remote.is_uri(req.results) else None  # refuses a scheme pyarrow cannot open
    space = None if req.extend and req.name else load_space(req.space_path)  # extending keeps the sweep's own space
    name = req.name or space.name
    if not is_plain_name(name):
        raise AslTuneError(f"--name: must be a plain folder name, got {name!r}")
    folder, mirror = _place(req.results, name)
    with _peek(folder, mirror) as (where, shown):
        exists = (where / SWEEP_FILE).exists()
        if space is None:
            space = load_space(where / SPACE_FILE) if (where / SPACE_FILE).is_file() else load_space(req.space_path)
        if exists and not req.extend:
            raise AslTuneError(
                f"--name: a sweep named {name!r} already exists in {shown}; add --extend to add trials to it, "
                f"or run `asl-tune resume {name}{_results_flag(req.results)}` to finish an interrupted one"
            )
        if req.extend and not exists:
            raise AslTuneError(f"--extend: there is no sweep named {name!r} in {req.results} to extend")
        state = SweepState.read(where, f"{shown}/{SWEEP_FILE}") if req.extend else None
    if state is not None and state.runs and not state.runs[-1]["finished"]:
        if folder.is_dir():
            with _exclusive(folder, name):  # refused here when another driver is running it now
                pass
        raise AslTuneError(f"--extend: the last run of {name!r} did not finish; run `asl-tune resume {name}{_results_flag(req.results)}` first")
    if mirror is None:
        _check_writable(Path(req.results))
    else:
        _check_writable(folder.parent, "--results: cannot keep the working copy in")
        if uri_fs[0].type_name == "local":
            _check_writable(Path(uri_fs[1]))
    _image_sizes(space)  # refuses a searched image_size that is not categorical
    return Checked(space, name, folder, mirror, state)


def _results_flag(results: Path | str) -> str:
    """` --results R` for commands suggested to the user, unless R is the default."""
    return "" if str(results) == "results" else f" --results {results}"


def _check_writable(results: Path, what: str = "--results: cannot write to") -> None:
    """Refuse a --results folder that cannot be created or written, before anything is made."""
    probe_root = results
    while not probe_root.exists():
        probe_root = probe_root.parent
    if not probe_root.is_dir() or not os.access(probe_root, os.W_OK | os.X_OK):
        raise AslTuneError(f"{what} {results} ({probe_root} is not a writable folder)")


def _image_sizes(space: SearchSpace) -> list[int]:
    """Every image size a trial may ask for: each is decoded once and shared."""
    if "image_size" in space.params:
        p = space.params["image_size"]
        if p.type != "categorical":
            raise AslTuneError(f"{space.source}: params.image_size: must be categorical (each size is decoded once for the whole sweep), got type {p.type}")
        return sorted(set(p.choices))
    return [int(space.fixed.get("image_size", 200))]


def _load_data(data: Path | None, external: Path | None, sizes: list[int]) -> tuple[Path, dict[int, DecodedDataset], dict[int, DecodedDataset]]:
    if data is None:
        from asl_tune.synth import ensure_default_dataset

        data = ensure_default_dataset()
    datasets = {s: load_dataset(data, s) for s in sizes}
    externals = {s: load_external(external, datasets[s].classes, s) for s in sizes} if external else {}
    return Path(data).resolve(), datasets, externals


def run_sweep(req: SweepRequest) -> Path:
    """`asl-tune sweep`: start a new sweep, or extend one; return its (local) folder."""
    space, name, folder, mirror, state = check_request(req)
    sizes = _image_sizes(space)
    if state is not None:
        data_dir, datasets, externals = _load_data(Path(state.data), Path(state.external) if state.external else None, sizes)
    else:
        data_dir, datasets, externals = _load_data(req.data, req.external, sizes)
        storage = req.storage or (mirror.uri if mirror else None)  # results at a URI: Ray's runs go there too
        state = SweepState(name, str(data_dir), str(Path(req.external).resolve()) if req.external else None, req.cpus_per_trial, req.gpus_per_trial, req.max_concurrent, req.seed, req.address, storage=storage)
    num_samples = int(req.num_samples or space.num_samples)
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AslTuneError(f"--results: cannot write to {folder}: {e.strerror or e}") from None
    where = mirror.remote if mirror else folder
    try:
        with _exclusive(folder, name):
            if mirror:
                mirror.pull()  # the URI is the record: this machine's copy may be empty or stale
            if not req.extend and (folder / SWEEP_FILE).exists():  # another process started it meanwhile
                raise AslTuneError(f"--name: a sweep named {name!r} already exists in {where}; add --extend to add trials to it")
            with cluster.ray_session(req.address, dashboard=req.dashboard):
                if req.extend:
                    state = SweepState.read(folder)  # as it stands now that we hold the lock
                gpus = _check_resources(state.cpus_per_trial, state.gpus_per_trial)
                if not req.extend:
                    shutil.copyfile(req.space_path, folder / SPACE_FILE)
                    if mirror:
                        mirror.sync(final=True)  # refused here, before the sweep exists, when the URI cannot be written
                run_dir = f"{RAY_DIR}/run-{len(state.runs) + 1}"
                state.runs.append({"dir": run_dir, "num_samples": num_samples, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": False})
                state.write(folder)
                if mirror:
                    mirror.sync(final=True)
                shown = f"{where} (working copy {folder})" if mirror else where
                print(f"sweep {name!r}: {num_samples} trials of {space.source} on {data_dir}; results in {shown}", file=sys.stderr)
                tuner = _new_tuner(space, folder, run_dir, num_samples, datasets, externals, state, gpus, first_run=len(state.runs) == 1, mirror=mirror)
                return _fit(tuner, folder, state, name, mirror)
    except BaseException:
        if created and not (folder / SWEEP_FILE).exists():  # refused before it began: leave nothing behind
            shutil.rmtree(folder, ignore_errors=True)
        raise


@contextmanager
def _exclusive(folder: Path, name: str) -> Iterator[None]:
    """Hold the sweep's lock while its driver runs: a second driver on the same sweep is refused, not merged.

    The lock is an flock on a file in the folder, so the kernel releases it when the holder dies, even by SIGKILL.
    """
    fd = os.open(folder / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise AslTuneError(f"--name: sweep {name!r} in {folder} is being run by another asl-tune process right now; wait for it, or stop it first") from None
        yield
    finally:
        os.close(fd)


def resume_sweep(name: str, results: Path | str = Path("results"), address: str | None = None) -> Path:
    """`asl-tune resume`: finish a sweep whose driver died; finished trials are kept, interrupted ones continue."""
    if remote.is_uri(results):
        remote.open_uri(str(results))  # refuses a scheme pyarrow cannot open
    if not is_plain_name(name):
        raise AslTuneError(f"NAME: must be a plain folder name, got {name!r}")
    folder, mirror = _place(results, name)
    with _peek(folder, mirror) as (where, shown):
        if not (where / SWEEP_FILE).exists():
            raise AslTuneError(f"NAME: no sweep named {name!r} in {results} (no {shown}/{SWEEP_FILE})")
        state = SweepState.read(where, f"{shown}/{SWEEP_FILE}")
        if not state.runs or state.runs[-1]["finished"]:
            raise AslTuneError(f"NAME: sweep {name!r} has nothing to resume: every run finished; add trials with `asl-tune sweep --name {name} --extend --num-samples K{_results_flag(results)}`")
        space = load_space(where / SPACE_FILE)
    address = address or state.address
    if address:
        cluster.parse_address(address)
    data_dir, datasets, externals = _load_data(Path(state.data), Path(state.external) if state.external else None, _image_sizes(space))
    run = state.runs[-1]
    from ray import tune

    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise AslTuneError(f"--results: cannot write to {folder}: {e.strerror or e}") from None
    with _exclusive(folder, name):
        if mirror:
            mirror.pull()  # the URI is the record: this machine's copy may be empty or stale
        state = SweepState.read(folder)  # as it stands now that we hold the lock
        if state.runs[-1]["finished"]:
            raise AslTuneError(f"NAME: sweep {name!r} has nothing to resume: another process finished it")
        with cluster.ray_session(address):
            gpus = _check_resources(state.cpus_per_trial, state.gpus_per_trial)
            run_path = state.run_path(folder, run)
            trainable = _trainable(space, datasets, externals, state.cpus_per_trial, gpus)
            if not tune.Tuner.can_restore(run_path):
                # The driver died before Tune saved any state: nothing ran, so start this run afresh.
                if not state.storage:
                    shutil.rmtree(run_path, ignore_errors=True)
                tuner = _new_tuner(space, folder, run["dir"], run["num_samples"], datasets, externals, state, gpus, first_run=len(state.runs) == 1, mirror=mirror)
            else:
                # Tune restores our recorder and searcher as pickled; for results at a URI both find this
                # machine's working copy themselves (record.ParquetRecorder.folder, study.StagedStudyStorage).
                tuner = tune.Tuner.restore(run_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
            print(f"resuming sweep {name!r} from {run_path}", file=sys.stderr)
            return _fit(tuner, folder, state, name, mirror)


def _check_resources(cpus_per_trial: float, gpus_per_trial: float | None) -> float:
    """Refuse a trial that could never be placed; return the GPUs per trial to use."""
    total = cluster.resources()
    if cpus_per_trial > total["cpu"]:
        raise AslTuneError(f"--cpus-per-trial: the cluster has {total['cpu']:g} CPUs, got {cpus_per_trial:g}")
    if gpus_per_trial is None:
        return 1.0 if total["gpu"] >= 1 else 0.0
    if gpus_per_trial > total["gpu"]:
        raise AslTuneError(f"--gpus-per-trial: the cluster has {total['gpu']:g} GPUs, got {gpus_per_trial:g}")
    return gpus_per_trial


def _trainable(space: SearchSpace, datasets: dict, externals: dict, cpus: float, gpus: float):
    """The trial function with the decoded arrays put into Ray's object store once, and its resources."""
    from ray import tune

    from asl_tune.trial import run_trial

    # with_parameters: one ray.put per sweep; trials on a node map the same read-only memory.
    fn = tune.with_parameters(run_trial, space=space, datasets=datasets, externals=externals or None)
    return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus})


def _searcher(space: SearchSpace, folder: Path, name: str, seed: int, max_concurrent: int | None, first_run: bool, mirror: Mirror | None = None):
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    from asl_tune.study import study_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    metrics = [m for m, _ in space.objectives]
    modes = [m for _, m in space.objectives]
    multi = len(metrics) > 1
    sampler = optuna.samplers.RandomSampler(seed=seed) if space.sampler == "random" else optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    searcher = OptunaSearch(
        space={k: p.to_optuna() for k, p in space.params.items()},
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        points_to_evaluate=[dict(p) for p in space.points] if first_run and space.points else None,
        sampler=sampler,
        study_name=name,
        storage=study_storage(folder, STUDY_FILE, mirror),
    )
    return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher


def _scheduler(space: SearchSpace, n_train: int):
    """ASHA on training images seen, so a trial on 30% of the data is judged after as many images, not epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    max_t = space.max_epochs() * space.max_fraction() * n_train
    grace = min(space.grace_epochs * n_train, max_t)
    if not space.early_stopping or grace >= max_t:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="images_seen",
        metric=space.metric,
        mode=space.mode,
        max_t=max_t,
        grace_period=grace,
        reduction_factor=space.reduction_factor,
        stop_last_trials=False,  # a trial at max_t finishes its own last epoch and final evaluation
    )


def _new_tuner(space, folder: Path, run_dir: str, num_samples: int, datasets, externals, state: SweepState, gpus: float, first_run: bool, mirror: Mirror | None = None):
    from ray import tune

    from asl_tune.record import ParquetRecorder

    any_ds = next(iter(datasets.values()))
    n_train = len(make_splits(any_ds.labels, any_ds.frames, space.fixed.get("split", "blocked"), state.seed).train)
    return tune.Tuner(
        _trainable(space, datasets, externals, state.cpus_per_trial, gpus),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, folder, state.name, state.seed, state.max_concurrent, first_run, mirror),
            scheduler=_scheduler(space, n_train),
            num_samples=num_samples,
            reuse_actors=True,  # one worker process runs trial after trial: no spawn, no re-import, data already mapped
        ),
        run_config=tune.RunConfig(
            name=Path(run_dir).name,
            storage_path=state.ray_root(folder),
            callbacks=[ParquetRecorder(folder, space, num_samples, mirror)],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=1,
        ),
    )


def _fit(tuner, folder: Path, state: SweepState, name: str, mirror: Mirror | None = None) -> Path:
    """Run the tuner; mark the run finished when every trial ended; say where the results are."""
    # Results are read from our Parquet, not Ray's per-trial JSON (switched off), so keep Ray from asking for it.
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)
    # A trial resumed from a checkpoint older than its last report runs that epoch again; Optuna keeps the
    # first value and warns. Expected here (the Parquet row is keyed by epoch and replaced), so not shown.
    warnings.filterwarnings("ignore", message=r"The reported value is ignored because this `step=\d+` is already reported", category=UserWarning)
    try:
        grid = tuner.fit()
    finally:
        if mirror:
            mirror.sync()  # whatever the run left, the URI gets it
    ended = grid.num_terminated + grid.num_errors
    wanted = state.runs[-1]["num_samples"]
    trials = read_trials(folder)
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    flag = f" --results {mirror.uri}" if mirror else ""
    if ended < wanted or counts.get("running", 0):
        raise AslTuneError(f"sweep {name!r} was interrupted; run `asl-tune resume {name}{flag}` to finish it")
    state.runs[-1]["finished"] = True
    state.runs[-1]["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    state.write(folder)
    if mirror:
        mirror.sync(final=True)
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    best = trials[trials["status"].isin(FINISHED)].sort_values("val_accuracy", ascending=False).head(1)
    print(f"sweep {name!r} done: {len(trials)} trials ({summary})", file=sys.stderr)
    if len(best):
        print(f"best val_accuracy {best['val_accuracy'].iloc[0]:.4f} (trial {best['trial_id'].iloc[0]})", file=sys.stderr)
    where = f"{mirror.remote}/" if mirror else f"{folder}/"
    print(f"results: {where}trials.parquet, epochs.parquet, confusion.parquet; next: asl-tune analyze {name}{flag}", file=sys.stderr)
    if mirror:
        print(f"(working copy: {folder})", file=sys.stderr)
    return folder
