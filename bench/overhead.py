"""What a sweep costs beyond its trials' own compute: Ray start, trial start-up, data hand-off, bookkeeping.

Runs the same fixed trial (no searched setting changes the work) N times two ways:

  alone  train_trial in this process, one after another, with threads = cpus per trial;
         trial_compute_s is the sum of their train_seconds (whole trial: training, evaluation, speed test)
  sweep  asl_tune.sweep.run_sweep with the same trials at concurrency C; sweep_wall_s runs from
         before ray.init to the end of run_sweep (Ray start, data put, spawn, imports and results count)

overhead_ratio = sweep_wall_s / (trial_compute_s / concurrency). Target: 1.10 or less.

A trial's fixed cost: first_epoch_extra_s (alone and in the sweep) is the median over trials of the first
epoch's seconds less the median of its later epochs'. Whether Tune reuses the trial workers
(reuse_actors=True in run.py): worker_pids counts the distinct processes that ran a trial, sampled
from /proc every half second while the sweep runs (bench/fullsize.py's Sampler); fewer than trials
means a worker ran more than one trial.

    python bench/overhead.py --json
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fullsize import Sampler  # noqa: E402
from harness import emit, machine, say, synthetic_dataset  # noqa: E402

TARGET = 1.10
SPACE_NAME = "bench-overhead"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="a folder-per-class dataset (default: synthetic, --per-class frames per class)")
    p.add_argument(
        "--per-class", type=int, default=40, help="synthetic images per class when --data is not given (default 40: 812 training images)"
    )
    p.add_argument("--image-size", type=int, default=64, help="input side, px (default 64)")
    p.add_argument("--head-width", type=int, default=128, help="DexNet head width (default 128)")
    p.add_argument("--epochs", type=int, default=2, help="epochs per trial (default 2: about 20-40 s a trial on 2 CPU cores)")
    p.add_argument("--trials", type=int, default=8, help="trials in the sweep (default 8; the target asks for 8 or more)")
    p.add_argument("--concurrency", type=int, default=2, help="trials at once in the sweep (default 2)")
    p.add_argument("--cpus-per-trial", type=int, default=1, help="CPUs (and torch threads) per trial, both ways (default 1)")
    p.add_argument(
        "--alone-runs",
        type=int,
        default=None,
        help="time only this many trials alone and scale to --trials (default: all; identical trials, so fewer is a shortcut)",
    )
    p.add_argument("--results", type=Path, default=None, help="keep the sweep folder here (default: a temporary folder, removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


def write_space(folder: Path, args: argparse.Namespace) -> Path:
    """A space whose one 'searched' setting has a single choice: every trial is the same fixed work, run to the end."""
    path = folder / f"{SPACE_NAME}.yaml"
    path.write_text(
        f"name: {SPACE_NAME}\n"
        "metric: val_accuracy\nmode: max\n"
        f"num_samples: {args.trials}\n"
        "sampler: random\nearly_stopping: false\n"
        f"fixed: {{image_size: {args.image_size}, batch_size: 64, epochs: {args.epochs}, data_fraction: 1.0, split: blocked, lr: 0.01, momentum: 0.9}}\n"
        f"params:\n  head_width: {{type: categorical, choices: [{args.head_width}]}}\n"
    )
    return path


def first_epoch_extra_s(epochs: list[list[float]]) -> float | None:
    """Median over trials of (first epoch's seconds - median of its later epochs'): a trial's fixed cost in its first epoch."""
    extra = [e[0] - statistics.median(e[1:]) for e in epochs if len(e) >= 2]
    return statistics.median(extra) if extra else None


def time_alone(space_path: Path, data: Path, runs: int, threads: int) -> tuple[list[float], list[list[float]]]:
    """train_seconds of `runs` trials of the space's one configuration, trained one after another in this process,
    and each trial's epochs' seconds."""
    from asl_tune.data import load_dataset
    from asl_tune.sweep.space import load_space
    from asl_tune.train import train_trial

    space = load_space(space_path)
    config = space.config({"head_width": space.params["head_width"].choices[0]})
    ds = load_dataset(data, config.image_size, progress=True)
    seconds, epochs = [], []
    for k in range(runs):
        result = train_trial(config, ds, threads=threads)
        seconds.append(float(result.final["train_seconds"]))
        epochs.append([float(e["seconds"]) for e in result.epochs])
        say(f"alone {k + 1}/{runs}: {seconds[-1]:.1f} s (val accuracy {result.final['val_accuracy']:.3f})")
    return seconds, epochs


def time_sweep(space_path: Path, data: Path, results: Path, args: argparse.Namespace) -> dict:
    """Wall seconds of a whole sweep, Ray start included, and what its trials recorded."""
    from asl_tune.results import read_epochs, read_trials
    from asl_tune.sweep import cluster
    from asl_tune.sweep.request import SweepRequest
    from asl_tune.sweep.run import run_sweep

    req = SweepRequest(
        space_path=space_path,
        data=data,
        results=results,
        name=f"{SPACE_NAME}-{time.strftime('%Y%m%d-%H%M%S')}",
        num_samples=args.trials,
        max_concurrent=args.concurrency,
        cpus_per_trial=args.cpus_per_trial,
        seed=0,
    )
    t0 = time.perf_counter()
    # Start Ray here so its start-up is timed on its own too; run_sweep reuses the running instance.
    with cluster.ray_session():
        ray_start_s = time.perf_counter() - t0
        # Ray's processes are this one's descendants: the sampler sees each trial worker (ray::ImplicitFunc) by its PID.
        with contextlib.redirect_stdout(sys.stderr), Sampler(os.getpid()) as sampled:  # Tune's progress tables: keep stdout for the figures
            folder = run_sweep(req)
        wall = time.perf_counter() - t0
    trials = read_trials(folder)
    epochs = read_epochs(folder)
    return {
        "worker_pids": len(sampled.trials),
        "first_epoch_extra_s": first_epoch_extra_s([list(g.sort_values("epoch")["seconds"]) for _, g in epochs.groupby("trial_id")]),
        "sweep_wall_s": wall,
        "ray_start_s": ray_start_s,
        "sweep_trials_completed": int((trials["status"] == "completed").sum()),
        "sweep_trial_seconds_sum": float(trials["train_seconds"].sum()),
    }


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if min(args.trials, args.concurrency, args.cpus_per_trial, args.epochs) < 1:
        print("overhead.py: --trials, --concurrency, --cpus-per-trial and --epochs must be >= 1", file=sys.stderr)
        return 2
    runs = min(args.alone_runs or args.trials, args.trials)
    data = args.data or synthetic_dataset(args.per_class)
    scratch = Path(tempfile.mkdtemp(prefix="asl-bench-overhead-"))
    results = args.results or scratch / "results"
    figures = {**machine()}
    try:
        space_path = write_space(scratch, args)
        say(f"{runs} trial(s) alone, {args.cpus_per_trial} thread(s) each")
        alone, alone_epochs = time_alone(space_path, data, runs, args.cpus_per_trial)
        trial_compute_s = sum(alone) * args.trials / runs
        say(f"sweep of {args.trials} trials at concurrency {args.concurrency}")
        sweep = time_sweep(space_path, data, results, args)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    ideal = trial_compute_s / args.concurrency
    figures.update(
        sweep_wall_s=sweep["sweep_wall_s"],
        trial_compute_s=trial_compute_s,
        concurrency=args.concurrency,
        overhead_ratio=sweep["sweep_wall_s"] / ideal,
        meets_target=sweep["sweep_wall_s"] / ideal <= TARGET,
        trials=args.trials,
        alone_runs=runs,
        alone_trial_s_mean=sum(alone) / len(alone),
        ray_start_s=sweep["ray_start_s"],
        # Inside the sweep, trials share the machine: their own seconds say how much is contention, not overhead.
        sweep_trial_seconds_sum=sweep["sweep_trial_seconds_sum"],
        contention_ratio=sweep["sweep_trial_seconds_sum"] / trial_compute_s,
        # The same ratio against the trials' own seconds inside the sweep: orchestration alone, contention excluded.
        overhead_ratio_own_seconds=sweep["sweep_wall_s"] / (sweep["sweep_trial_seconds_sum"] / args.concurrency),
        sweep_trials_completed=sweep["sweep_trials_completed"],
        # Fewer worker processes than trials: Tune reused a worker (reuse_actors) for a later trial.
        worker_pids=sweep["worker_pids"],
        workers_reused=0 < sweep["worker_pids"] < args.trials,
        first_epoch_extra_s_alone=first_epoch_extra_s(alone_epochs),
        first_epoch_extra_s_sweep=sweep["first_epoch_extra_s"],
        cpus_per_trial=args.cpus_per_trial,
        image_size=args.image_size,
        epochs=args.epochs,
    )
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
