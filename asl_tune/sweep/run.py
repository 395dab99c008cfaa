"""Sweeps: Optuna proposes settings, Ray Tune runs and early-stops the trials, Parquet keeps the results.

`run_sweep` and `resume_sweep` take a request that request.py has checked, decode the data once,
start or join Ray, and wire Tune: the trial function (trainable.py) with the arrays in the object store,
Optuna as searcher (study.py keeps its study, Optuna's journal), ASHA on images seen, and the Parquet recorder
(recorder.py) as a callback. The sweep's folder and what it holds are described in request.py; the code
here holds it as one mirror.SweepFolder, a folder or a working copy of one at a URI, and never asks which.

What a sweep changes for the whole process (environment variables Ray reads, Optuna's verbosity, a
logger's level, a warning filter) is changed for the sweep only and restored when it returns or raises.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from asl_tune.data import load_dataset, load_external, make_splits
from asl_tune.errors import RAY_FAILED, AslTuneError, RayFailed, Stopped, TrialsErrored
from asl_tune.results import FINISHED, compact, read_trials
from asl_tune.sweep import cluster, integrity, progress
from asl_tune.sweep.mirror import SweepFolder, is_uri
from asl_tune.sweep.request import (
    LOGS_DIR,
    RAY_DIR,
    SPACE_FILE,
    SWEEP_FILE,
    NothingToResume,
    SweepRequest,
    SweepState,
    check_request,
    check_resume,
    exclusive,
    image_sizes,
)
from asl_tune.sweep.space import SearchSpace

MAX_FAILURES = 2  # an errored trial is retried from its last checkpoint this many times
# Results are read from our Parquet, not Ray's per-trial JSON (switched off), so this logger's requests for it are noise.
EXPERIMENT_ANALYSIS_LOGGER = "ray.tune.analysis.experiment_analysis"
# A trial resumed from a checkpoint older than its last report runs that epoch again; Optuna keeps the first
# value and warns. Expected here (the Parquet row is keyed by epoch and replaced), so not shown.
REPEATED_STEP_WARNING = r"The reported value is ignored because this `step=\d+` is already reported"
# Loggers whose warnings and errors (snapshot timing, token authentication, failed trials' tracebacks) asl-tune's quiet output leaves out.
RAY_LOGGERS = ("ray.tune", "ray._private", "ray.train")


@contextmanager
def _quiet(verbose: bool = False) -> Iterator[None]:
    """Optuna's per-trial info lines, that logger and that warning silenced for the sweep, and restored after it;
    unless verbose, Ray Tune's warnings too (its status tables are off: RunConfig verbose 0) and asl-tune's
    status line on (progress.py).

    Only our own warning filter is removed afterwards: warnings.catch_warnings would also drop the filters
    that Ray and torch add when they are first imported, which happens inside the sweep.
    """
    import optuna

    loggers = [logging.getLogger(EXPERIMENT_ANALYSIS_LOGGER)] + ([] if verbose else [logging.getLogger(n) for n in RAY_LOGGERS])
    verbosity, levels, before = optuna.logging.get_verbosity(), [lg.level for lg in loggers], list(warnings.filters)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for lg in loggers:  # a failed trial's traceback (Tune logs it at ERROR) is in its log file, named on asl-tune's own line
        lg.setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", message=REPEATED_STEP_WARNING, category=UserWarning)
    ours = warnings.filters[0]
    try:
        # Tune's newer output prints its configuration box even at verbose 0; the older one prints nothing then.
        with progress.quiet(not verbose), cluster.scoped_environment({} if verbose else {"RAY_AIR_NEW_OUTPUT": "0"}):
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        if ours not in before and ours in warnings.filters:
            warnings.filters.remove(ours)


def _data_folder(data: Path | None) -> Path:
    """The dataset folder, resolved: --data, or the embedded synthetic dataset (rendered on first use)."""
    if data is None:
        from asl_tune.synth import ensure_default_dataset

        data = ensure_default_dataset()
    return Path(data).resolve()


def _load_data(space: SearchSpace, state: SweepState, gpus: float, num_samples: int, local: bool) -> tuple[dict, dict, int]:
    """The memory plan (handoff.py), then the data decoded (through the cache) at each image size the space uses,
    handed to Ray one copy per node: ({size: SharedDataset}, the same for the external set or {}, trials at once)."""
    from asl_tune.sweep import handoff

    sizes = image_sizes(space)
    data, external = Path(state.data), Path(state.external) if state.external else None
    cluster_nodes = handoff.nodes(local)
    plan = handoff.plan(data, external, sizes, cluster_nodes, state.cpus_per_trial, gpus, state.max_concurrent, num_samples)
    plan.say()
    datasets = {s: load_dataset(data, s) for s in sizes}
    externals = {s: load_external(external, datasets[s].classes, s) for s in sizes} if external else {}
    return handoff.share(datasets, cluster_nodes), handoff.share(externals, cluster_nodes), sum(plan.at_once.values())


def run_sweep(req: SweepRequest) -> Path:
    """`asl-tune sweep`: start a new sweep, or extend one; return its (local) folder.

    Long: the steps of starting a sweep in their order (lock, checks, Ray, plan, decode, record, fit), under one cleanup.
    """
    space, name, sweep, state = check_request(req)
    cluster.lost_head_after_s()  # a bad ASL_TUNE_LOST_HEAD_S is refused here, before anything is made
    folder = sweep.path
    num_samples = int(req.num_samples or space.num_samples)
    data_dir = _data_folder(req.data) if state is None else None
    created = _make_folder(folder)
    with exclusive(folder, name):  # refused here, touching nothing, while another driver holds the sweep
        try:
            sweep.pull()  # the record may be at a URI: this machine's copy may be empty or stale
            if not req.extend and (folder / SWEEP_FILE).exists():  # another process started it meanwhile
                raise AslTuneError(f"--name: a sweep named {name!r} already exists in {sweep.location}; add --extend to add trials to it")
            if req.extend:  # the sweep's folder is checked whole before Ray starts, its data is decoded or anything is written
                integrity.check_for_extend(folder, sweep.location)
            with _quiet(req.verbose), cluster.ray_session(req.address, dashboard=req.dashboard, ship_code=req.ship_code):
                # cluster checks before decoding (issue 26): ray_session found the cluster and was let in; can every node see the folder?
                cluster.check_storage_visible(
                    req.address, folder, SweepState.read(folder).storage if req.extend else req.storage or sweep.ray_storage
                )
                if req.extend:
                    state = SweepState.read(folder)  # as it stands now that we hold the lock
                    state.tensorboard, state.mlflow = (
                        state.tensorboard or req.tensorboard,
                        req.mlflow or state.mlflow,
                    )  # --extend may add a tracker
                else:
                    storage = req.storage or sweep.ray_storage  # results at a URI: Ray's runs go there too
                    state = SweepState(
                        name,
                        str(data_dir),
                        str(Path(req.external).resolve()) if req.external else None,
                        req.cpus_per_trial,
                        req.gpus_per_trial,
                        req.max_concurrent,
                        req.seed,
                        req.address,
                        storage=storage,
                        tensorboard=req.tensorboard,
                        mlflow=req.mlflow,
                    )
                gpus = _check_resources(state.cpus_per_trial, state.gpus_per_trial)
                datasets, externals, at_once = _load_data(space, state, gpus, num_samples, local=req.address is None)
                if not req.extend:
                    shutil.copyfile(req.space_path, folder / SPACE_FILE)
                    sweep.sync(final=True)  # refused here, before the sweep exists, when a URI cannot be written
                run_dir = f"{RAY_DIR}/run-{len(state.runs) + 1}"
                state.runs.append(
                    {"dir": run_dir, "num_samples": num_samples, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "finished": False}
                )
                state.write(folder)
                sweep.sync(final=True)
                print(
                    f"sweep {name!r}: {num_samples} trials of {space.source} on {state.data}; results in {sweep.described}", file=sys.stderr
                )
                tuner = _new_tuner(
                    space.seeded(state.seed), sweep, run_dir, num_samples, datasets, externals, state, gpus, first_run=len(state.runs) == 1
                )
                return _fit(tuner, sweep, state, at_once)
        except BaseException:
            if created and not (folder / SWEEP_FILE).exists():  # ours, and refused before it began: leave nothing behind
                shutil.rmtree(created, ignore_errors=True)
            raise


def resume_sweep(
    name: str, results: Path | str = Path("results"), address: str | None = None, verbose: bool = False, ship_code: bool = True
) -> Path:
    """`asl-tune resume`: finish a sweep whose driver died; finished trials are kept, interrupted ones continue."""
    space, sweep, state, address = check_resume(name, results, address)
    cluster.lost_head_after_s()
    folder = sweep.path
    space = space.seeded(state.seed)
    from ray import tune

    _make_folder(folder)
    with exclusive(folder, name):
        sweep.pull()  # the record may be at a URI: this machine's copy may be empty or stale
        state = SweepState.read(folder)  # as it stands now that we hold the lock
        if not state.resumable():
            raise NothingToResume(name, sweep, state)  # another process finished it meanwhile
        run = state.runs[-1]
        earlier = sum(r["num_samples"] for r in state.runs[:-1])
        integrity.check_for_resume(folder, sweep.location, None if state.storage else run["dir"], earlier)
        with _quiet(verbose), cluster.ray_session(address, ship_code=ship_code):
            # cluster checks before decoding (issue 26): ray_session found the cluster and was let in; can every node see the folder?
            cluster.check_storage_visible(address, folder, state.storage)
            gpus = _check_resources(state.cpus_per_trial, state.gpus_per_trial)
            datasets, externals, at_once = _load_data(space, state, gpus, run["num_samples"], local=address is None)
            run_path = state.run_path(folder, run)
            trainable = _trainable(space, datasets, externals, state.cpus_per_trial, gpus)
            if not tune.Tuner.can_restore(run_path):
                # The driver died before Tune saved any state: nothing ran, so start this run afresh.
                if not state.storage:
                    shutil.rmtree(run_path, ignore_errors=True)
                tuner = _new_tuner(
                    space, sweep, run["dir"], run["num_samples"], datasets, externals, state, gpus, first_run=len(state.runs) == 1
                )
            else:
                # Tune restores our recorder and searcher as pickled; each finds this machine's copy of the sweep
                # folder itself (mirror.MirroredSweepFolder works out its working copy where it is unpickled).
                tuner = tune.Tuner.restore(run_path, trainable=trainable, resume_unfinished=True, resume_errored=True)
                if getattr(tuner, "_local_tuner", None) is not None:  # not through ray:// (Ray Client), which keeps the saved one
                    tuner._local_tuner.get_run_config().verbose = _ray_verbosity()  # this resume's --verbose, not the first run's
            print(f"resuming sweep {name!r} from {run_path}", file=sys.stderr)
            return _fit(tuner, sweep, state, at_once)


def _make_folder(folder: Path) -> Path | None:
    """Create the sweep's folder (and its parents) if need be; the topmost folder this process created (then, and
    only then, may it remove it: a sweep refused before it began leaves nothing behind), else None."""
    top = next((p for p in [*reversed(folder.parents), folder] if not p.exists()), None)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir()
        return top
    except FileExistsError:
        return None
    except OSError as e:
        raise AslTuneError(f"--results: cannot write to {folder}: {e.strerror or e}") from None


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

    from asl_tune.sweep.trainable import run_trial

    # The datasets are handoff.SharedDataset: each trial maps its node's one copy (handoff.py).
    fn = tune.with_parameters(run_trial, space=space, datasets=datasets, externals=externals or None)
    return tune.with_resources(fn, {"cpu": cpus, "gpu": gpus})


def _searcher(space: SearchSpace, sweep: SweepFolder, name: str, seed: int, max_concurrent: int | None, first_run: bool):
    import optuna
    from ray.tune.search import ConcurrencyLimiter

    from asl_tune.sweep.study import StudySearch, study_storage

    metrics = [m for m, _ in space.objectives]
    modes = [m for _, m in space.objectives]
    multi = len(metrics) > 1
    sampler = (
        optuna.samplers.RandomSampler(seed=seed) if space.sampler == "random" else optuna.samplers.TPESampler(seed=seed, constant_liar=True)
    )
    searcher = StudySearch(
        space={k: p.to_optuna() for k, p in space.params.items()},
        metric=metrics if multi else metrics[0],
        mode=modes if multi else modes[0],
        points_to_evaluate=[dict(p) for p in space.points] if first_run and space.points else None,
        sampler=sampler,
        study_name=name,
        storage=study_storage(sweep),
    )
    return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher


def _ray_verbosity() -> int:
    """RunConfig.verbose: Ray Tune's status tables only with --verbose (asl-tune's status line otherwise)."""
    return 0 if progress.shows_status() else 1


def _new_tuner(
    space, sweep: SweepFolder, run_dir: str, num_samples: int, datasets, externals, state: SweepState, gpus: float, first_run: bool
):
    from ray import tune

    from asl_tune.sweep import tracking
    from asl_tune.sweep.recorder import DropRecordedParts, ParquetRecorder
    from asl_tune.sweep.schedule import scheduler

    any_ds = next(iter(datasets.values())).meta
    n_train = len(
        make_splits(any_ds.labels, any_ds.frames, space.fixed.get("split", "blocked"), space.fixed.get("split_seed", state.seed)).train
    )
    return tune.Tuner(
        _trainable(space, datasets, externals, state.cpus_per_trial, gpus),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, sweep, state.name, state.seed, state.max_concurrent, first_run),
            scheduler=scheduler(space, n_train),
            num_samples=num_samples,
            reuse_actors=True,  # one worker process runs trial after trial: no spawn, no re-import, data already mapped
        ),
        run_config=tune.RunConfig(
            name=Path(run_dir).name,
            storage_path=state.ray_root(sweep.path),
            callbacks=[
                ParquetRecorder(sweep, space, num_samples),
                *tracking.callbacks(sweep.path, space, state.name, state.tensorboard, state.mlflow),
                DropRecordedParts(space),
            ],
            failure_config=tune.FailureConfig(max_failures=MAX_FAILURES),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            verbose=_ray_verbosity(),
        ),
    )


@contextmanager
def _stop_on_signals() -> Iterator[list[int]]:
    """While Tune runs, SIGTERM (what Slurm, Kubernetes and spot instances send before SIGKILL) and Ctrl-C stop
    the sweep gracefully: Tune schedules nothing more, ends the running trials (TUNE_FORCE_TRIAL_CLEANUP_S) and
    saves its state, and the recorder has written every result. A second signal stops at once. Yields the list
    of signals received. (Tune's own SIGINT handler is switched off in cluster.LOCAL_ENV; its SIGUSR1 handler,
    which does the same, is what this calls.)"""
    received: list[int] = []

    def on_signal(signum, frame) -> None:
        tune_stop = signal.getsignal(signal.SIGUSR1)
        if received or not callable(tune_stop):
            raise KeyboardInterrupt
        received.append(signum)
        tune_stop(signum, frame)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def _first_line(e: BaseException) -> str:
    """An exception as one short line: its type and the first line of its message (Ray's run to dozens of lines)."""
    text = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def _log_driver_failure(folder: Path, e: BaseException) -> Path:
    """Write the traceback of what failed under the sweep to LOGS_DIR/driver-<time>.log in its folder; return the file."""
    import traceback

    log = folder / LOGS_DIR / f"driver-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("".join(traceback.format_exception(e)))
    return log


def _end_on_lost_head(name: str, resume: str):
    """What cluster.watch_head calls, on its thread, once the head is gone: Ray cannot go on, so neither can this process."""

    def lost_head(address: str, after_s: float) -> None:
        from asl_tune.sweep.study import flush_journals

        print(
            f"asl-tune: error: sweep {name!r} lost its Ray cluster: the head at {address} has not answered for {after_s:g} s; "
            f"what Tune saved and the results so far are kept; once the cluster is back, run `{resume}`",
            file=sys.stderr,
            flush=True,
        )
        flush_journals()
        os._exit(RAY_FAILED)  # as a driver killed outright: resume re-runs whatever came after Tune's last save

    return lost_head


def _fit(tuner, sweep: SweepFolder, state: SweepState, at_once: int) -> Path:
    """Run the tuner (at_once trials at a time, the memory plan's); mark the run finished when every trial ended; say where the results are.

    Long: every way a run ends (finished, trials errored, a signal, Ray failing, its head lost) in one place, each with its one line.
    """
    name, folder = sweep.name, sweep.path
    wanted = state.runs[-1]["num_samples"]
    resume = f"asl-tune resume {name}{sweep.results_flag}"
    local = not is_uri(sweep.results)  # a copy at a URI has no one-step swap: its parts are left as they are (results/README.md)
    if local:
        compact(folder)  # a resumed or extended sweep's ended trials: one part per table, not one per trial (results.compact)

    with (
        _stop_on_signals() as received,
        cluster.scoped_environment(cluster.tune_environment(wanted, at_once)),
        cluster.watch_head(_end_on_lost_head(name, resume)),
    ):
        try:
            grid = tuner.fit()
        except (AslTuneError, KeyboardInterrupt):
            raise
        except Exception as e:  # Ray failed under the sweep (a process killed for memory, a lost head): one line, the traceback in a file
            log = _log_driver_failure(folder, e)
            raise RayFailed(
                f"sweep {name!r} failed under Ray Tune ({_first_line(e)}); the results so far are written and the traceback is in "
                f"{log.relative_to(folder.parent)}; run `{resume}` to go on"
            ) from None
        finally:
            sweep.sync()  # whatever the run left, a URI gets it
    if local:
        compact(folder)  # and those this run ended
    ended = grid.num_terminated + grid.num_errors
    trials = read_trials(folder)
    counts = trials["status"].value_counts().to_dict() if len(trials) else {}
    if received and (ended < wanted or counts.get("running", 0)):  # a signal that came as the last trial ended stops nothing
        raise Stopped(
            f"sweep {name!r} stopped by {signal.Signals(received[0]).name}; Tune saved its state and the results are written; continue with `{resume}`",
            received[0],
        )
    if ended < wanted or counts.get("running", 0):
        raise RayFailed(f"sweep {name!r} was interrupted ({ended} of {wanted} trials ended); run `{resume}` to finish it")
    errored = trials[trials["trial_id"].isin(progress.errored_ids(grid))] if len(trials) else trials
    # A run with errored trials is finished (--extend may follow), and `resume` runs them again from their last
    # checkpoints (a worker killed for memory, a lost node, a bug since fixed): SweepState.resumable.
    state.runs[-1]["finished"] = True
    state.runs[-1]["errored"] = sorted(errored["trial_id"]) if len(errored) else []
    state.runs[-1]["driver_peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    state.write(folder)
    sweep.sync(final=True)
    summary = ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in sorted(counts.items()))
    best = trials[trials["status"].isin(FINISHED)].sort_values("val_accuracy", ascending=False).head(1)
    print(f"sweep {name!r} done: {len(trials)} trials ({summary})", file=sys.stderr)
    if len(best):
        print(f"best val_accuracy {best['val_accuracy'].iloc[0]:.4f} (trial {best['trial_id'].iloc[0]})", file=sys.stderr)
        if "checkpoint" in best.columns and best["checkpoint"].notna().iloc[0]:
            print(
                f"its weights: {best['checkpoint'].iloc[0]} (asl-tune evaluate WEIGHTS --data DIR scores them on other images)",
                file=sys.stderr,
            )
    for line in sweep.results_lines():
        print(line, file=sys.stderr)
    if len(errored):  # exit status 0 only when no trial of this run errored (errors.TrialsErrored: 3)
        raise TrialsErrored(
            f"{progress.errored_message(name, ended, errored.to_dict('records'), sweep.path)}; `{resume}` runs them again from their last checkpoints"
        )
    return folder
