"""Does ASHA + TPE find as good a model as full-budget random search, for less compute?

Three modes, on one space and one dataset:

  --record      run a real grid (every configuration to its full epochs, no early stopping) with
                asl_tune.sweep and keep its trials.parquet and epochs.parquet (and grid.json) in --grid
  (default)     replay the grid's learning curves through both strategies, many seeds, in simulation:
                  full-budget random search: --trials configurations drawn at random, each run to the end
                  ASHA + TPE: Optuna's TPE sampler (seeded, constant liar, as asl_tune.sweep sets it up)
                  picks among the grid's configurations; an ASHA simulator with rungs on images seen
                  (Ray's rule: stop a trial below the rung's 1 - 1/reduction_factor quantile) stops them,
                  --concurrency trials at a time, epochs taking their recorded seconds
  --check-real  also run one real ASHA + TPE sweep on the same space and data, and compare it with the
                simulation of the same seed and with the simulated spread over seeds

asha_compute_fraction: images ASHA + TPE had processed (all trials) when its best full-budget trial first
came within --tolerance-pp of the random search's best full-budget accuracy, divided by the random search's
total images. accuracy_gap_pp: how far ASHA + TPE's best full-budget accuracy ends below that best (0 when
it matches or beats it). Targets: asha_compute_fraction <= 0.35, accuracy_gap_pp <= 0.5.

    python bench/search_efficiency.py --record            # once, on a quiet machine (~10-14 min on 2 cores)
    python bench/search_efficiency.py --json              # seconds
    python bench/search_efficiency.py --check-real --json # adds one real ASHA sweep (~5 min)
"""

from __future__ import annotations

import argparse
import contextlib
import heapq
import itertools
import json
import math
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say, synthetic_dataset  # noqa: E402

GRID_DIR = Path(__file__).resolve().parent / "grid"
GRID_META = "grid.json"
TARGET_FRACTION = 0.35
TARGET_GAP_PP = 0.5


class GridError(Exception):
    """The recorded grid is missing or unusable: a user error, reported on one line with exit status 2."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--grid", type=Path, default=GRID_DIR, help=f"folder of the recorded grid (default {GRID_DIR})")
    g = p.add_argument_group("recording the grid (--record)")
    g.add_argument("--record", action="store_true", help="run the grid for real and write it to --grid, then simulate")
    g.add_argument("--per-class", type=int, default=50, help="synthetic images per class (default 50: 1,015 training images)")
    g.add_argument("--image-size", type=int, default=48, help="input side, px (default 48)")
    g.add_argument("--epochs", type=int, default=4, help="full budget, epochs (default 4)")
    g.add_argument(
        "--head-widths", type=int, nargs="+", default=[64, 128, 256, 512], help="grid values of head_width (default 64 128 256 512)"
    )
    g.add_argument(
        "--lrs", type=float, nargs="+", default=[0.002, 0.006, 0.02, 0.06], help="grid values of lr (default 0.002 0.006 0.02 0.06)"
    )
    g.add_argument(
        "--batch-size", type=int, default=16, help="training batch, fixed (default 16: four times the SGD steps of 64 per epoch)"
    )
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, fixed (default 0.9)")
    g.add_argument(
        "--dropout", type=float, default=0.0, help="head dropout, fixed (default 0: with the seed's 0.5, CPU-sized trials stay near chance)"
    )
    s = p.add_argument_group("the simulation")
    s.add_argument(
        "--trials", type=int, default=None, help="trials per search, both strategies (default: the grid's number of configurations)"
    )
    s.add_argument("--seeds", type=int, default=100, help="simulated searches per strategy (default 100)")
    s.add_argument("--reduction-factor", type=float, default=3.0, help="ASHA's reduction factor (default 3, the library's)")
    s.add_argument("--grace-epochs", type=float, default=1.0, help="ASHA's first rung, in epochs of images (default 1)")
    s.add_argument(
        "--concurrency",
        type=int,
        default=2,
        help="trials running at once, simulated and in the real sweeps of --record and --check-real (default 2)",
    )
    s.add_argument(
        "--clock",
        choices=("seconds", "images"),
        default="seconds",
        help="what an epoch's duration is in the simulation: its recorded seconds (default) or its images",
    )
    s.add_argument("--tolerance-pp", type=float, default=0.5, help="how close to the best counts as found, percentage points (default 0.5)")
    r = p.add_argument_group("the real check (--check-real)")
    r.add_argument("--check-real", action="store_true", help="run one real ASHA + TPE sweep and compare it with the simulation")
    r.add_argument("--real-seed", type=int, default=0, help="the real sweep's seed (default 0)")
    r.add_argument("--keep", type=Path, default=None, help="keep the real sweep's folders under this folder (default: removed)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


# ------------------------------------------------------------------ spaces and the real runs


def _yaml_float(value: float) -> str:
    """A float as YAML reads it back as a float (PyYAML takes 1e-05 for a string; 0.00001 is a float)."""
    text = format(float(value), ".12f").rstrip("0")
    return text + "0" if text.endswith(".") else text


def space_yaml(name: str, meta: dict, trials: int, sampler: str, early_stopping: str, with_points: bool) -> str:
    """A search space over the grid's values (categorical, so a real sweep only visits recorded configurations)."""
    widths = ", ".join(str(int(h)) for h in meta["head_widths"])
    lrs = ", ".join(_yaml_float(lr) for lr in meta["lrs"])
    points = ""
    if with_points:
        rows = [f"  - {{head_width: {int(h)}, lr: {_yaml_float(lr)}}}" for h, lr in itertools.product(meta["head_widths"], meta["lrs"])]
        points = "points:\n" + "\n".join(rows) + "\n"
    return (
        f"name: {name}\nmetric: val_accuracy\nmode: max\nnum_samples: {trials}\nsampler: {sampler}\n"
        f"early_stopping: {early_stopping}\n"
        f"fixed: {{image_size: {meta['image_size']}, batch_size: {meta.get('batch_size', 64)}, epochs: {meta['epochs']}, data_fraction: 1.0, split: blocked, momentum: {_yaml_float(meta.get('momentum', 0.9))}, dropout: {_yaml_float(meta.get('dropout', 0.5))}}}\n"
        f"params:\n  head_width: {{type: categorical, choices: [{widths}]}}\n"
        f"  lr: {{type: categorical, choices: [{lrs}]}}\n" + points
    )


def run_real_sweep(space_text: str, name: str, data: Path, trials: int, concurrency: int, seed: int, parent: Path) -> tuple[Path, float]:
    """Run asl_tune's own sweep on the space; return (its folder, wall seconds)."""
    from asl_tune.sweep.request import SweepRequest
    from asl_tune.sweep.run import run_sweep

    parent.mkdir(parents=True, exist_ok=True)
    space_path = parent / f"{name}.yaml"
    space_path.write_text(space_text)
    req = SweepRequest(
        space_path=space_path,
        data=data,
        results=parent,
        name=name,
        num_samples=trials,
        max_concurrent=concurrency,
        cpus_per_trial=1,
        seed=seed,
    )
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr):  # Tune's progress tables: keep stdout for the figures
        folder = run_sweep(req)
    return folder, time.perf_counter() - t0


def class_count(folder: Path) -> int:
    """How many classes the grid's trials were trained on (from the confusion matrices)."""
    from asl_tune.results import read_confusion

    confusion = read_confusion(folder)
    return confusion["true_label"].nunique() if len(confusion) else 29


def record_grid(args: argparse.Namespace) -> None:
    """Run every grid configuration to its full epochs and keep the small result files in --grid."""
    meta = {
        "per_class": args.per_class,
        "image_size": args.image_size,
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "momentum": args.momentum,
        "dropout": args.dropout,
        "head_widths": args.head_widths,
        "lrs": args.lrs,
        "concurrency": args.concurrency,
        "machine": machine(),
    }
    n = len(args.head_widths) * len(args.lrs)
    data = synthetic_dataset(args.per_class)
    scratch = Path(tempfile.mkdtemp(prefix="asl-bench-grid-"))
    try:
        text = space_yaml("bench-grid", meta, n, "random", "false", with_points=True)
        say(f"recording a grid of {n} configurations x {args.epochs} epochs at {args.image_size} px")
        folder, wall = run_real_sweep(text, "bench-grid", data, n, args.concurrency, 0, scratch)
        args.grid.mkdir(parents=True, exist_ok=True)
        for name in ("trials.parquet", "epochs.parquet", "space.yaml"):
            shutil.copyfile(folder / name, args.grid / name)
        meta["wall_s"] = wall
        meta["num_classes"] = int(class_count(folder))
        (args.grid / GRID_META).write_text(json.dumps(meta, indent=2) + "\n")
        say(f"grid recorded in {args.grid} ({wall:.0f} s)")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ------------------------------------------------------------------ the recorded curves


def config_key(head_width, lr) -> tuple[int, float]:
    """A configuration's key; lr rounded to 10 significant digits, so a value that went through YAML or Parquet still matches."""
    return int(head_width), float(f"{float(lr):.10g}")


@dataclass(frozen=True)
class Curve:
    """One configuration's recorded run: per epoch, its validation accuracy, images seen so far and seconds."""

    accuracy: tuple[float, ...]  # NaN where the trial diverged
    images: tuple[int, ...]  # cumulative images seen at the end of each epoch
    seconds: tuple[float, ...]  # each epoch's own duration


@dataclass(frozen=True)
class Grid:
    """The recorded grid: a curve per configuration (head_width, lr), and the full budget in epochs."""

    curves: dict[tuple, Curve]
    epochs: int
    meta: dict

    def final(self, key: tuple) -> float:
        """The configuration's full-budget accuracy, or NaN when it did not run all epochs."""
        c = self.curves[key]
        return c.accuracy[-1] if len(c.accuracy) == self.epochs else math.nan

    @property
    def images_per_epoch(self) -> int:
        return next(iter(self.curves.values())).images[0]


def load_grid(folder: Path) -> Grid:
    """Read a recorded grid (trials.parquet, epochs.parquet, grid.json)."""
    from asl_tune.results import read_epochs, read_trials

    if not (folder / GRID_META).is_file():
        raise GridError(f"no recorded grid in {folder}; run with --record first")
    meta = json.loads((folder / GRID_META).read_text())
    trials, epochs = read_trials(folder), read_epochs(folder)
    curves = {}
    for row in trials.itertuples():
        key = config_key(row.params_head_width, row.params_lr)
        rows = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        curves[key] = Curve(
            tuple(rows["val_accuracy"].astype(float)), tuple(rows["images_seen"].astype(int)), tuple(rows["seconds"].astype(float))
        )
    widths, lrs = sorted({k[0] for k in curves}), sorted({k[1] for k in curves})
    missing = [k for k in itertools.product(widths, lrs) if k not in curves or not curves[k].accuracy]
    if missing or len(widths) * len(lrs) != len(meta["head_widths"]) * len(meta["lrs"]):
        raise GridError(f"the grid in {folder} is incomplete (missing {missing or 'configurations'}); record it again")
    # The searched values as stored (read back from Parquet), so every suggestion names a recorded curve.
    return Grid(curves, int(meta["epochs"]), {**meta, "head_widths": widths, "lrs": lrs})


# ------------------------------------------------------------------ the two strategies, simulated


def simulate_random(grid: Grid, trials: int, seed: int) -> dict:
    """Full-budget random search: `trials` configurations drawn uniformly (as Optuna's RandomSampler over the categoricals), each run to its end."""
    keys = sorted(grid.curves)
    rng = np.random.default_rng(seed)
    picked = [keys[i] for i in rng.integers(len(keys), size=trials)]
    finals = [grid.final(k) for k in picked]
    return {
        "images": sum(grid.curves[k].images[-1] for k in picked),
        "best": np.nanmax(finals) if not all(map(math.isnan, finals)) else math.nan,
    }


class Asha:
    """Ray Tune's asynchronous successive halving, one bracket, stop_last_trials=False, on images seen."""

    def __init__(self, min_t: float, max_t: float, reduction_factor: float):
        self.rf = reduction_factor
        n_rungs = int(np.log(max_t / min_t) / np.log(reduction_factor) + 1)
        self.rungs = [(min_t * reduction_factor**k, {}) for k in reversed(range(n_rungs))]

    def keep_going(self, trial: int, images: int, value: float) -> bool:
        """Ray's _Bracket.on_result: False when the trial falls below its rung's cutoff."""
        for milestone, recorded in self.rungs:
            if images >= milestone and trial in recorded:
                return True  # decided at this rung already
            if images < milestone or trial in recorded:
                continue
            values = list(recorded.values())
            cutoff = np.nanpercentile(values, (1 - 1 / self.rf) * 100) if values else None
            recorded[trial] = value
            return not (cutoff is not None and value < cutoff)
        return True


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    trial: int = field(compare=False)


@dataclass
class _Running:
    key: tuple
    ot_trial: object
    epoch: int = 0  # epochs finished
    epoch_started: float = 0.0
    epoch_ends: float = 0.0


def _duration(grid: Grid, key: tuple, epoch: int, clock: str) -> float:
    """How long epoch `epoch` (0-based) of a configuration takes in the simulation."""
    c = grid.curves[key]
    return c.seconds[epoch] if clock == "seconds" else float(c.images[0])


def simulate_asha_tpe(
    grid: Grid, trials: int, seed: int, rf: float, grace_epochs: float, concurrency: int, clock: str, target: float
) -> dict:
    """ASHA + TPE replayed on the recorded curves; returns total images, best full-budget accuracy and images used when target was reached."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True))
    dists = {
        "head_width": optuna.distributions.CategoricalDistribution(sorted(grid.meta["head_widths"])),
        "lr": optuna.distributions.CategoricalDistribution(sorted(grid.meta["lrs"])),
    }
    per_epoch = grid.images_per_epoch
    max_t = grid.epochs * per_epoch
    asha = Asha(grace_epochs * per_epoch, max_t, rf) if grace_epochs * per_epoch < max_t else None
    running: dict[int, _Running] = {}
    events: list[_Event] = []
    done_images, best, reached_at, launched, seq, now = 0, -math.inf, None, 0, 0, 0.0
    stopped = 0

    def launch() -> None:
        nonlocal launched, seq
        t = study.ask(dists)
        key = config_key(t.params["head_width"], t.params["lr"])
        run = _Running(key, t, epoch_started=now, epoch_ends=now + _duration(grid, key, 0, clock))
        running[launched] = run
        heapq.heappush(events, _Event(run.epoch_ends, seq, launched))
        launched, seq = launched + 1, seq + 1

    def images_now() -> float:
        """Images processed by now: finished epochs plus the running epochs' share so far."""
        partial = sum(per_epoch * (now - r.epoch_started) / max(r.epoch_ends - r.epoch_started, 1e-12) for r in running.values())
        return done_images + partial

    while launched < min(concurrency, trials):
        launch()
    while events:
        ev = heapq.heappop(events)
        now, run = ev.time, running[ev.trial]
        curve = grid.curves[run.key]
        done_images += curve.images[run.epoch] - (curve.images[run.epoch - 1] if run.epoch else 0)
        acc = curve.accuracy[run.epoch]
        value = acc if math.isfinite(acc) else -math.inf  # trial.searcher_value: a diverged trial ranks last
        run.epoch += 1
        last = run.epoch >= len(curve.accuracy)
        go_on = not last and (asha is None or asha.keep_going(ev.trial, curve.images[run.epoch - 1], value))
        if go_on:
            run.epoch_started, run.epoch_ends = now, now + _duration(grid, run.key, run.epoch, clock)
            heapq.heappush(events, _Event(run.epoch_ends, seq, ev.trial))
            seq += 1
            continue
        del running[ev.trial]
        study.tell(run.ot_trial, value)
        stopped += not last
        if last and run.epoch == grid.epochs and math.isfinite(acc) and acc > best:
            best = acc
            if reached_at is None and best >= target:
                reached_at = images_now()
        if launched < trials:
            launch()
    return {
        "images": done_images,
        "best": best if math.isfinite(best) else math.nan,
        "images_at_target": reached_at,
        "stopped_early": stopped,
    }


def compare(grid: Grid, args: argparse.Namespace, trials: int) -> tuple[dict, list[dict]]:
    """Both strategies over --seeds seeds: the headline figures and one row per seed."""
    rows = []
    for seed in range(args.seeds):
        rnd = simulate_random(grid, trials, seed)
        target = rnd["best"] - args.tolerance_pp / 100
        asha = simulate_asha_tpe(grid, trials, seed, args.reduction_factor, args.grace_epochs, args.concurrency, args.clock, target)
        reached = asha["images_at_target"] is not None
        rows.append(
            {
                "seed": seed,
                "random_best": rnd["best"],
                "random_images": rnd["images"],
                "asha_best": asha["best"],
                "asha_images": asha["images"],
                "asha_stopped_early": asha["stopped_early"],
                "reached": reached,
                "fraction": asha["images_at_target"] / rnd["images"] if reached else math.inf,
                "gap_pp": max(0.0, 100 * (rnd["best"] - np.nan_to_num(asha["best"], nan=0.0))),
            }
        )
    fractions = [r["fraction"] for r in rows]
    reached = [r["fraction"] for r in rows if r["reached"]]
    finals = [grid.final(k) for k in grid.curves]
    figures = {
        # Mean over the seeds where ASHA + TPE got there; reached_share says how often that was.
        "asha_compute_fraction": statistics.mean(reached) if reached else math.inf,
        "accuracy_gap_pp": statistics.mean(r["gap_pp"] for r in rows),
        "meets_target_fraction": bool(reached) and statistics.mean(reached) <= TARGET_FRACTION,
        "meets_target_gap": statistics.mean(r["gap_pp"] for r in rows) <= TARGET_GAP_PP,
        "reached_share": len(reached) / len(rows),
        # Unreached seeds count as infinite here, so this is honest when ASHA + TPE often misses.
        "asha_compute_fraction_median": float(np.median(fractions)),
        "asha_total_compute_fraction": statistics.mean(r["asha_images"] / r["random_images"] for r in rows),
        "accuracy_gap_pp_p90": float(np.percentile([r["gap_pp"] for r in rows], 90)),
        "random_best_mean": statistics.mean(r["random_best"] for r in rows),
        "asha_best_mean": statistics.mean(np.nan_to_num(r["asha_best"]) for r in rows),
        "grid_best": float(np.nanmax(finals)),
        "n_configs": len(grid.curves),
        "trials": trials,
        "seeds": args.seeds,
        "reduction_factor": args.reduction_factor,
        "grace_epochs": args.grace_epochs,
        "concurrency": args.concurrency,
        "clock": args.clock,
        "epochs": grid.epochs,
        "image_size": grid.meta["image_size"],
    }
    return figures, rows


def informative(grid: Grid, min_lift_pp: float = 5.0, min_spread_pp: float = 1.0) -> dict:
    """Whether the grid can tell strategies apart: its best must beat chance clearly and its configurations must differ."""
    finals = np.array([grid.final(k) for k in grid.curves], dtype=float)
    chance = 1 / grid.meta.get("num_classes", 29)
    lift = 100 * (np.nanmax(finals) - chance) if np.isfinite(finals).any() else 0.0
    spread = 100 * (np.nanmax(finals) - np.nanmin(finals)) if np.isfinite(finals).any() else 0.0
    return {
        "chance_accuracy": chance,
        "grid_spread_pp": float(spread),
        "grid_informative": bool(lift >= min_lift_pp and spread >= min_spread_pp),
    }


# ------------------------------------------------------------------ the real check


def check_real(grid: Grid, args: argparse.Namespace, trials: int, rows: list[dict]) -> dict:
    """One real ASHA + TPE sweep against the simulation: total images, best accuracy, stops, and the replayed curves."""
    from asl_tune.results import read_epochs, read_trials

    data = synthetic_dataset(grid.meta["per_class"])
    es = f"{{reduction_factor: {args.reduction_factor}, grace_epochs: {args.grace_epochs}}}"
    text = space_yaml("bench-asha-real", grid.meta, trials, "tpe", es, with_points=False)
    parent = args.keep or Path(tempfile.mkdtemp(prefix="asl-bench-asha-"))
    try:
        say(f"real ASHA + TPE sweep, {trials} trials, seed {args.real_seed}")
        folder, wall = run_real_sweep(
            text, f"bench-asha-real-s{args.real_seed}-{time.strftime('%H%M%S')}", data, trials, args.concurrency, args.real_seed, parent
        )
        real_trials, real_epochs = read_trials(folder), read_epochs(folder)
    finally:
        if args.keep is None:
            shutil.rmtree(parent, ignore_errors=True)
    last_images = real_epochs.groupby("trial_id")["images_seen"].max()
    full = real_trials[real_trials["epochs_completed"] == grid.epochs]
    real_best = float(full["val_accuracy"].max()) if len(full) else math.nan
    real_images = int(last_images.sum())
    same = next(r for r in rows if r["seed"] == args.real_seed) if args.real_seed < len(rows) else None
    sim_images = statistics.mean(r["asha_images"] for r in rows)
    sim_best = statistics.mean(np.nan_to_num(r["asha_best"]) for r in rows)
    out = {
        "real_wall_s": wall,
        "real_images": real_images,
        "real_best": real_best,
        "real_stopped_early": int((real_trials["status"] == "stopped_early").sum()),
        "real_total_compute_fraction": real_images / statistics.mean(r["random_images"] for r in rows),
        "sim_images_mean": sim_images,
        "sim_best_mean": sim_best,
        "sim_images_p10_p90": [float(np.percentile([r["asha_images"] for r in rows], q)) for q in (10, 90)],
        "curve_replay_gap_pp": _curve_gap_pp(grid, real_trials, real_epochs),
        "sim_vs_real_gap": {
            "images_rel": real_images / sim_images - 1,
            "best_pp": 100 * (real_best - sim_best),
        },
    }
    if same is not None:
        out["sim_same_seed"] = {"images": same["asha_images"], "best": same["asha_best"], "stopped_early": same["asha_stopped_early"]}
    return out


def _curve_gap_pp(grid: Grid, trials, epochs) -> float:
    """Mean |real - recorded| validation accuracy, in points, over every epoch the real sweep ran: is replay faithful?"""
    gaps = []
    for row in trials.itertuples():
        curve = grid.curves.get(config_key(row.params_head_width, row.params_lr))
        if curve is None:
            continue
        for e in epochs[epochs["trial_id"] == row.trial_id].itertuples():
            if e.epoch <= len(curve.accuracy) and math.isfinite(e.val_accuracy) and math.isfinite(curve.accuracy[e.epoch - 1]):
                gaps.append(abs(e.val_accuracy - curve.accuracy[e.epoch - 1]) * 100)
    return statistics.mean(gaps) if gaps else math.nan


# ------------------------------------------------------------------ putting it together


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if min(args.seeds, args.concurrency, args.trials or 1) < 1 or args.reduction_factor <= 1 or args.grace_epochs <= 0:
        print(
            "search_efficiency.py: --seeds, --concurrency, --trials must be >= 1, --reduction-factor > 1, --grace-epochs > 0",
            file=sys.stderr,
        )
        return 2
    if args.record:
        record_grid(args)
    try:
        grid = load_grid(args.grid)
    except GridError as e:
        print(f"search_efficiency.py: {e}", file=sys.stderr)
        return 2
    trials = args.trials or len(grid.curves)
    say(f"simulating {args.seeds} seeds x 2 strategies, {trials} trials each, on {len(grid.curves)} recorded configurations")
    figures, rows = compare(grid, args, trials)
    figures["grid_wall_s"] = grid.meta.get("wall_s")
    figures.update(informative(grid))
    if not figures["grid_informative"]:
        say("WARNING: the grid's curves barely rise above chance or barely differ: these figures say nothing about the strategies")
    if args.check_real:
        figures.update(check_real(grid, args, trials, rows))
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
