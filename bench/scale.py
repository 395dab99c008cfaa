"""What asl-tune's driver-side pieces cost as a sweep grows, measured against bare Ray Tune.

Two parts, both with a trivial trainable (no torch: each trial reports --epochs made-up epochs as fast
as Tune takes them):

  stack  the real driver stack, at each N in --sizes: Tune with asl-tune's searcher (OptunaSearch, TPE,
         its study storage), ASHA and the Parquet recorder, writing to a folder ("asl_tune") and, as a
         second setting, mirrored to a file:// URI ("asl_tune_mirror"); then the same trainable under
         bare Ray Tune ("bare_tune": no callbacks, the default searcher, FIFO), and under Ray Tune and
         Optuna wired by hand ("tune_optuna": Ray's OptunaSearch with TPE in memory, Ray's ASHA on the same
         rungs, no callbacks), which splits asl-tune's cost into what TPE and ASHA cost anyone and what
         asl-tune adds (its study file, the recorder, progress lines). All in one Ray instance, with
         asl-tune's Ray settings (Ray's own result loggers off) for all.
  micro  the recorder and the study storage called directly, --micro-trials trials x --micro-epochs
         epochs, no Tune, a flush at each trial's end (as for trials longer than a second; the driver writes
         shorter ones together): the cost per result over the first 100 trials and over the last 100, for the
         recorder and for asl-tune's study storage ("study": Optuna's journal, appended in batches);
         "recorder_and_study" is what the driver pays. With --micro-compare also Optuna's own journal file
         backend ("optuna_journal": a lock and an fsync per change) and the SQLite study.db ("sqlite") of
         sweeps made before study.log. Then what Tune keeps of a trial for the whole sweep ("tune_trial_kb":
         1,000 of its Trial objects fed the made-up reports, whole and as asl-tune's DropRecordedParts leaves
         them). Then reading the folder it wrote, as a finished sweep's: `read_trials` before and after the
         driver's compaction (results.compact) and the time that takes, `asl_tune.load` after it, and
         `asl_tune.analyze` after it in a process of its own (its wall time and peak RSS; speeds as trained).
  bookkeeping  (--bookkeeping, instead of the stack part) Ray Tune's own bookkeeping release test on this
         machine (ray-project/ray, release/tune_tests/scalability_tests/workloads/test_bookkeeping_overhead.py):
         at each N in --sizes, N trials of 1 s each (one report, then a 1-s sleep; no torch), one CPU each,
         so theory is N / CPUs seconds; asl-tune's whole stack ("asl_tune": TPE on the study journal, the
         recorder and its progress lines, ASHA off) and bare Tune as Ray's test sets it up ("bare_tune": its
         trainable's config, the default searcher, reuse_actors=True, Tune's own loggers on, a save every
         100 s), in one Ray instance. The ratios are each wall time over theory.

The made-up reports have the trainer's keys and sizes (on the last epoch, the 29 x 29 confusion matrix and
the per-class rates), so the recorder writes all four tables and Tune keeps what it would of a real trial.

    python bench/scale.py --json                                          # N = 100, and the micro bench at 10,000 trials x 20 epochs
    python bench/scale.py --sizes 100 1000 --no-mirror --micro-trials 0 --json  # N = 100 and 1,000, bare Tune in the same run
    python bench/scale.py --bookkeeping --sizes 100 --micro-trials 0 --json     # Ray's bookkeeping test shape at N = 100
    python bench/scale.py --no-stack --json                                     # the micro bench and the reading of its folder only
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say  # noqa: E402

SETTINGS = ("bare_tune", "tune_optuna", "asl_tune", "asl_tune_mirror")
WINDOW = 100  # trials whose results are averaged for "the cost at N" in the micro bench
N_TRAIN = 1000  # images per epoch the made-up trials claim (ASHA's time axis)
SPACE = """name: scale
metric: val_accuracy
mode: max
num_samples: 1
sampler: {sampler}
early_stopping: {{grace_epochs: 2, reduction_factor: 3}}
fixed: {{image_size: 32, batch_size: 64, epochs: {epochs}, data_fraction: 1.0, split: blocked}}
params:
  lr: {{type: float, low: 0.001, high: 0.1, log: true}}
  head_width: {{type: categorical, choices: [16, 32, 64, 128]}}
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[100],
        help="trials per sweep in the stack part (default 100; --sizes 100 1000 --no-mirror --micro-trials 0 took 5.5 min on the 2 cores at load 1-3, about 20 min at load 8-12)",
    )
    p.add_argument("--epochs", type=int, default=10, help="epochs each made-up trial reports in the stack part (default 10)")
    p.add_argument("--micro-trials", type=int, default=10000, help="trials in the micro bench (default 10,000); 0 skips it")
    p.add_argument("--micro-epochs", type=int, default=20, help="epochs per trial in the micro bench (default 20)")
    p.add_argument(
        "--micro-compare",
        action="store_true",
        help="also time, in the micro bench, Optuna's own journal file backend (a lock and an fsync per change, about 3 ms a result) and the SQLite study.db of sweeps made before study.log (about 18 ms a result): at the default sizes they add about 10 and 60 min",
    )
    p.add_argument("--concurrency", type=int, default=2, help="trials at once (default 2: each asks for half the CPUs of a 2-core machine)")
    p.add_argument("--no-mirror", action="store_true", help="skip the setting with the mirror to a file:// URI")
    p.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=list(SETTINGS),
        help="which settings of the stack (or bookkeeping: bare_tune, asl_tune) part to run (default: all; e.g. --settings asl_tune --sizes 10000 for the driver's RSS at 10,000 trials); ratios need asl_tune and the setting they divide by",
    )
    p.add_argument(
        "--sampler",
        choices=("tpe", "random"),
        default="tpe",
        help="asl-tune's sampler in the stack and bookkeeping parts (default tpe; TPE's pass over the finished trials makes an ask cost O(N), so N = 10,000 takes about an hour here with it: random measures the rest of the stack, memory included, at that N in minutes)",
    )
    p.add_argument(
        "--bookkeeping",
        action="store_true",
        help="instead of the stack part, Ray's bookkeeping release test shape at each --sizes: N trials of 1 s (one report), asl-tune's whole stack and bare Tune (see above)",
    )
    p.add_argument(
        "--cpus",
        type=int,
        default=None,
        help="CPUs Ray is told this machine has, for --bookkeeping (default: its own). Ray's test has 16; its trials sleep, so "
        "16 on 2 cores is its shape and theory (N / 16 s), the driver taking 8 times the trials a second of 2 CPUs",
    )
    p.add_argument("--no-stack", action="store_true", help="skip the stack (or bookkeeping) part: the micro bench only")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


CLASSES = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + ["del", "nothing", "space"]  # alphabet.ASL_CLASSES


def made_up_epoch(config: dict, epoch: int, last: bool = False) -> dict:
    """One epoch's report with the keys and sizes of the trainer's (train.trial_metrics, train.EPOCH_ROW nested), made
    up from the settings alone; the last epoch's also has the test evaluation (29 x 29 confusion, per-class rates)."""
    accuracy = 1 - math.exp(-epoch * config["lr"] * 10) * (0.5 + 0.1 * math.log2(config["head_width"]) / 7)
    row = {
        "epoch": epoch,
        "train_loss": 1 - accuracy,
        "train_accuracy": accuracy,
        "val_loss": 1 - accuracy,
        "val_accuracy": accuracy,
        "train_img_per_s": 1000.0,
        "images_seen": epoch * N_TRAIN,
        "seconds": 0.001,
    }
    report = {
        "status": "running",
        "val_accuracy": accuracy,
        "epochs_completed": epoch,
        "images_seen": epoch * N_TRAIN,
        "train_img_per_s": 1000.0,
        "train_seconds": 0.001 * epoch,
        "n_parameters": 1000 * config["head_width"],
        "flops_per_image": 5e6,
        "device": "cpu",
        "precision": "fp32",
        "hostname": "bench",
        "infer_img_per_s": 2000.0,
        "latency_ms_p50": 1.0,
        "latency_ms_p95": 1.5,
        "keeps_up_30fps": True,
        "epoch_row": row,
    }
    if last:
        k = len(CLASSES)
        confusion = [[90 if t == p else (t * p + epoch) % 3 for p in range(k)] for t in range(k)]
        report.update(
            status="completed",
            test_accuracy=accuracy,
            test_loss=1 - accuracy,
            confusion=confusion,
            per_class=[{"class_name": c, "support": 100, "precision": 0.9, "recall": 0.9, "fpr": 0.003, "fnr": 0.1} for c in CLASSES],
            **{
                f"pair_{x}_as_{y}": 0.02
                for x, y in (("U", "R"), ("R", "U"), ("K", "V"), ("V", "K"), ("M", "N"), ("N", "M"), ("E", "S"), ("S", "E"), ("A", "T"))
            },
        )
    return report


def trivial_trainable(config: dict) -> None:
    """A trial with no work: reports config["epochs"] made-up epochs as fast as Tune takes them."""
    from ray import tune

    epochs = config.get("epochs", 10)
    for epoch in range(1, epochs + 1):
        tune.report(made_up_epoch(config, epoch, last=epoch == epochs))


class PeakRss:
    """The driver's resident memory, sampled every 0.1 s while a run lasts; .mb is its peak in MB.

    ru_maxrss is the process's peak since it began, so a run after a bigger one would report the bigger
    one's; this is each run's own (on top of whatever the runs before it left allocated).
    """

    def __enter__(self) -> "PeakRss":
        self.mb = self.now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.1):
            self.mb = max(self.mb, self.now())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.mb = max(self.mb, self.now())

    @staticmethod
    def now() -> float:
        try:
            with open("/proc/self/statm") as f:  # Linux: size, resident, ... in pages
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: the process's peak so far


def _run(tuner) -> dict:
    """Fit the tuner; its wall time, the driver's CPU seconds, its peak RSS meanwhile and the results Tune processed."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(sys.stderr), PeakRss() as rss:
        grid = tuner.fit()
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - usage.ru_utime) + (after.ru_stime - usage.ru_stime)
    results = sum(int((r.metrics or {}).get("training_iteration", 0)) for r in grid)
    errors = sum(1 for r in grid if r.error)
    pids = {(r.metrics or {}).get("pid") for r in grid} - {
        None
    }  # the worker processes that ran the trials: fewer than trials when Tune reused them
    return {
        "wall_s": wall,
        "driver_cpu_s": cpu,
        "results": results,
        "errors": errors,
        "trials": len(grid),
        "worker_pids": len(pids),
        "driver_cpu_s_per_result": cpu / max(results, 1),
        "driver_peak_rss_mb": rss.mb,
    }


def run_asl_tune(n: int, epochs: int, concurrency: int, work: Path, mirrored: bool, sampler: str = "tpe") -> dict:
    """The trivial trainable under asl-tune's driver stack: StudySearch (TPE, its study storage), ASHA, the Parquet recorder."""
    from ray import tune

    from asl_tune.sweep.mirror import MirroredSweepFolder, SweepFolder
    from asl_tune.sweep.recorder import DropRecordedParts, ParquetRecorder
    from asl_tune.sweep.request import MIRRORED
    from asl_tune.sweep.run import _searcher
    from asl_tune.sweep.schedule import scheduler as _scheduler
    from asl_tune.sweep.space import load_space

    name = f"scale-{n}{'-mirror' if mirrored else ''}"
    space_path = work / "scale.yaml"
    space_path.write_text(SPACE.format(epochs=epochs, sampler=sampler))
    space = load_space(space_path)
    sweep = MirroredSweepFolder((work / "bucket").as_uri(), name, MIRRORED) if mirrored else SweepFolder(work / "results", name)
    sweep.path.mkdir(parents=True)
    tuner = tune.Tuner(
        _trainable(epochs, concurrency),
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, sweep, name, 0, None, True), scheduler=_scheduler(space, N_TRAIN), num_samples=n, reuse_actors=True
        ),
        run_config=tune.RunConfig(
            name="run-1",
            storage_path=str(sweep.path / "ray"),
            callbacks=[ParquetRecorder(sweep, space, n), DropRecordedParts(space)],
            verbose=0,
        ),
    )
    figures = _run(tuner)
    sweep.sync(final=True)
    figures["files_bytes"] = _sizes(sweep.path)
    if mirrored:
        figures["uri_files_bytes"] = _sizes(work / "bucket" / name)
    return figures


def _with_epochs(config: dict, epochs: int) -> None:
    trivial_trainable({**config, "epochs": epochs})


def _trainable(epochs: int, concurrency: int):
    """The trivial trainable with --epochs, asking for a share of the CPUs that lets --concurrency trials run at once."""
    import ray
    from ray import tune

    return tune.with_resources(tune.with_parameters(_with_epochs, epochs=epochs), {"cpu": ray.cluster_resources()["CPU"] / concurrency})


def run_bare_tune(n: int, epochs: int, concurrency: int, work: Path) -> dict:
    """The same trainable under bare Ray Tune: no callbacks, the default searcher (random), FIFO."""
    from ray import tune

    tuner = tune.Tuner(
        _trainable(epochs, concurrency),
        param_space={"lr": tune.loguniform(0.001, 0.1), "head_width": tune.choice([16, 32, 64, 128])},
        tune_config=tune.TuneConfig(metric="val_accuracy", mode="max", num_samples=n, reuse_actors=True),
        run_config=tune.RunConfig(name=f"bare-{n}", storage_path=str(work / "bare"), verbose=0),
    )
    return _run(tuner)


def run_tune_optuna(n: int, epochs: int, concurrency: int, work: Path) -> dict:
    """The trainable under Ray Tune and Optuna as a user wires them by hand: OptunaSearch (TPE, its in-memory
    storage), Ray's ASHA on asl-tune's rungs (images seen, the same grace and reduction factor), no callbacks."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from asl_tune.sweep.space import load_space

    space_path = work / "scale.yaml"
    space_path.write_text(SPACE.format(epochs=epochs, sampler="tpe"))
    space = load_space(space_path)
    max_t = space.max_epochs() * space.max_fraction() * N_TRAIN
    asha = ASHAScheduler(
        time_attr="images_seen",
        max_t=max_t,
        grace_period=min(space.grace_epochs * N_TRAIN, max_t),
        reduction_factor=space.reduction_factor,
        stop_last_trials=False,
    )
    tuner = tune.Tuner(
        _trainable(epochs, concurrency),
        param_space={"lr": tune.loguniform(0.001, 0.1), "head_width": tune.choice([16, 32, 64, 128])},
        tune_config=tune.TuneConfig(
            metric="val_accuracy", mode="max", search_alg=OptunaSearch(seed=0), scheduler=asha, num_samples=n, reuse_actors=True
        ),
        run_config=tune.RunConfig(name=f"tune-optuna-{n}", storage_path=str(work / "tune-optuna"), verbose=0),
    )
    return _run(tuner)


BOOKKEEPING_SAVE_S = "100"  # Ray's test: os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "100"


def bookkeeping_trainable(config: dict) -> None:
    """Ray's release_test_util.function_trainable at trial_length_s = 1, results_per_second = 1: one report, then a
    1-s sleep; the report has the trainer's keys (made_up_epoch, its last epoch) so asl-tune's recorder writes every table."""
    from ray import tune

    tune.report(made_up_epoch(config, 1, last=True) if "lr" in config else {"score": config["score"]})
    time.sleep(1.0)


def run_bookkeeping_asl_tune(n: int, work: Path, at_once: int, sampler: str = "tpe") -> dict:
    """Ray's bookkeeping shape under asl-tune's whole driver stack: StudySearch (TPE, the study journal), FIFO, the recorder
    (its progress lines on stderr), DropRecordedParts, asl-tune's Tune settings (its save period, at_once trials pending);
    one CPU a trial."""
    from ray import tune

    from asl_tune.sweep.mirror import SweepFolder
    from asl_tune.sweep.recorder import DropRecordedParts, ParquetRecorder
    from asl_tune.sweep.run import _searcher
    from asl_tune.sweep.space import load_space

    name = f"bookkeeping-{n}"
    space_path = work / "bookkeeping.yaml"
    space_path.write_text(SPACE.format(epochs=1, sampler=sampler))
    space = load_space(space_path)
    sweep = SweepFolder(work / "results", name)
    sweep.path.mkdir(parents=True)
    tuner = tune.Tuner(
        tune.with_resources(bookkeeping_trainable, {"cpu": 1}),
        tune_config=tune.TuneConfig(search_alg=_searcher(space, sweep, name, 0, None, True), num_samples=n, reuse_actors=True),
        run_config=tune.RunConfig(
            name="run-1",
            storage_path=str(sweep.path / "ray"),
            callbacks=[ParquetRecorder(sweep, space, n), DropRecordedParts(space)],
            verbose=0,
        ),
    )
    from asl_tune.sweep import cluster

    with cluster.scoped_environment(cluster.tune_environment(n, at_once)):  # as sweep/run.py's _fit sets them
        return _run(tuner)


def run_bookkeeping_bare_tune(n: int, work: Path) -> dict:
    """Ray's bookkeeping test as it configures Tune: its trainable's config, the default searcher, reuse_actors=True,
    Tune's own loggers (on in Ray's test), a save every 100 s; one CPU a trial (Tune's default)."""
    from ray import tune

    from asl_tune.sweep import cluster

    tuner = tune.Tuner(
        bookkeeping_trainable,
        param_space={
            "score": tune.uniform(0.0, 1.0),
            "num_iters": 1,
            "sleep_time": 1.0,
            "checkpoint_iters": -1,
            "checkpoint_size_b": 0,
            "checkpoint_num_files": 1,
        },
        tune_config=tune.TuneConfig(num_samples=n, reuse_actors=True),
        run_config=tune.RunConfig(name=f"bookkeeping-bare-{n}", storage_path=str(work / "bare"), verbose=0),
    )
    with cluster.scoped_environment({"TUNE_GLOBAL_CHECKPOINT_S": BOOKKEEPING_SAVE_S, "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "0"}):
        return _run(tuner)


def _all_cpus_free(cpus: float, limit_s: float = 60.0) -> tuple[float, float]:
    """Wait (up to limit_s) until Ray has every CPU free; the seconds waited and the CPUs free then."""
    import ray

    t0 = time.monotonic()
    while (free := ray.available_resources().get("CPU", 0.0)) < cpus and time.monotonic() - t0 < limit_s:
        time.sleep(0.5)
    return time.monotonic() - t0, free


def bookkeeping(args: argparse.Namespace, work: Path) -> dict:
    """Each size under bare Tune then asl-tune, in one Ray instance; each run's wall over the theory (N trials of 1 s on the CPUs)."""
    import logging

    import ray

    from asl_tune.sweep import cluster

    runs: dict[str, dict] = {}
    with cluster.scoped_environment(cluster.LOCAL_ENV):
        ray.init(
            address="local",
            num_cpus=args.cpus,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        cpus = ray.cluster_resources()["CPU"]
        for n in args.sizes:
            settings = [
                ("bare_tune", run_bookkeeping_bare_tune),
                (
                    "asl_tune",
                    lambda n, work: run_bookkeeping_asl_tune(n, work, int(cpus), args.sampler),
                ),  # the plan's figure: a trial a CPU
            ]
            for setting, run in [(s, r) for s, r in settings if s in args.settings]:
                waited, free = _all_cpus_free(cpus)  # the run before's actors may still hold CPUs a while after it returns
                say(
                    f"bookkeeping {setting}: {n} trials of 1 s on {cpus:g} CPUs (theory {n / cpus:.0f} s), load {os.getloadavg()[0]:.2f}; {free:g} CPUs free after {waited:.1f} s"
                )
                load_before = os.getloadavg()
                figures = run(n, work)
                figures.update(
                    theory_s=n / cpus,
                    ratio=figures["wall_s"] / (n / cpus),
                    cpus=cpus,
                    cpus_free_at_start=free,
                    waited_for_cpus_s=waited,
                    load_avg_before=load_before,
                    load_avg_after=os.getloadavg(),
                )
                runs.setdefault(setting, {})[n] = figures
                say(
                    f"bookkeeping {setting}: {n} trials in {figures['wall_s']:.1f} s, {figures['ratio']:.2f} x theory, load {os.getloadavg()[0]:.2f}"
                )
        ray.shutdown()
    return runs


def _sizes(folder: Path) -> dict:
    """Bytes on disk per top-level entry of a sweep folder (a folder: all its files), and the count of files."""
    sizes = {}
    for entry in sorted(Path(folder).iterdir()):
        files = [entry] if entry.is_file() else [p for p in entry.rglob("*") if p.is_file()]
        sizes[entry.name] = {"bytes": sum(p.stat().st_size for p in files), "files": len(files)}
    return sizes


def stack(args: argparse.Namespace, work: Path) -> dict:
    """Every size under every setting, in one Ray instance: asl-tune's settings for it, without its workers' warm-up (torch)."""
    import logging

    import ray

    from asl_tune.sweep import cluster

    runs: dict[str, dict] = {}
    with cluster.scoped_environment(cluster.LOCAL_ENV):
        ray.init(address="local", include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False, logging_level=logging.WARNING)
        for n in args.sizes:
            settings = [
                ("bare_tune", lambda: run_bare_tune(n, args.epochs, args.concurrency, work)),
                ("tune_optuna", lambda: run_tune_optuna(n, args.epochs, args.concurrency, work)),
                ("asl_tune", lambda: run_asl_tune(n, args.epochs, args.concurrency, work, False, args.sampler)),
            ]
            if not args.no_mirror:
                settings.append(("asl_tune_mirror", lambda: run_asl_tune(n, args.epochs, args.concurrency, work, True, args.sampler)))
            for setting, run in [(s, r) for s, r in settings if s in args.settings]:
                say(f"{setting}: {n} trials x {args.epochs} epochs")
                # How often Tune saves its state, as asl-tune sets it for N, for all; the trials kept pending only for asl-tune's
                # own (its run._fit sets them; by hand, Tune keeps 1 pending for a searcher such as OptunaSearch).
                env = cluster.tune_environment(n, args.concurrency)
                if not setting.startswith("asl_tune"):
                    env.pop(cluster.PENDING_KEY)
                with cluster.scoped_environment(env):
                    runs.setdefault(setting, {})[n] = run()
                say(f"{setting}: {n} trials in {runs[setting][n]['wall_s']:.1f} s, {runs[setting][n]['results']} results")
        ray.shutdown()
    return runs


class _Trial:
    """What the recorder reads of a Tune trial: its id, settings, last result and whether it ended."""

    def __init__(self, trial_id: str, config: dict):
        self.trial_id, self.config, self.last_result, self.finished = trial_id, config, {}, False

    def is_finished(self) -> bool:
        return self.finished


def micro(args: argparse.Namespace, work: Path) -> dict:
    """The recorder's and each storage's cost per result, over the first WINDOW trials and the last WINDOW."""
    import optuna

    from asl_tune.sweep.mirror import SweepFolder
    from asl_tune.sweep.recorder import ParquetRecorder
    from asl_tune.sweep.space import load_space
    from asl_tune.sweep.study import SweepStudyStorage, study_storage

    space_path = work / "micro.yaml"
    space_path.write_text(SPACE.format(epochs=args.micro_epochs, sampler="tpe"))
    space = load_space(space_path)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = work / "micro" / "recorder"
    recorder = ParquetRecorder(folder, space, args.micro_trials)
    for sub in ("study", "optuna_journal", "sqlite"):
        (work / "micro" / sub).mkdir(parents=True)
    storages = {"study": study_storage(work / "micro" / "study")}  # asl-tune's: Optuna's journal, written in batches
    if args.micro_compare:
        storages["optuna_journal"] = optuna.storages.JournalStorage(
            optuna.storages.journal.JournalFileBackend(str(work / "micro" / "optuna_journal" / "study.log"))
        )
        storages["sqlite"] = SweepStudyStorage(SweepFolder(work / "micro", "sqlite"), "study.db")  # what sweeps made before study.log use
    studies = {k: optuna.create_study(study_name="micro", storage=s) for k, s in storages.items()}
    seconds = {k: [0.0] * args.micro_trials for k in ("recorder", *storages)}
    t0 = time.perf_counter()
    with PeakRss() as rss:  # the recorder's tables and every storage's study, all N trials held at the end
        for k in range(args.micro_trials):
            trial = _Trial(f"{k:08x}_{k:05d}", {"lr": 0.001 * (1 + k % 100), "head_width": 16 << (k % 4)})
            seconds["recorder"][k] = _record_trial(recorder, trial, args.micro_epochs)
            for key, study in studies.items():
                seconds[key][k] = _store_trial(study, trial, args.micro_epochs)
            if (k + 1) % 1000 == 0:
                say(f"micro: {k + 1} trials in {time.perf_counter() - t0:.0f} s")
    w = min(WINDOW, max(args.micro_trials // 2, 1))
    seconds["recorder_and_study"] = [r + q for r, q in zip(seconds["recorder"], seconds["study"])]  # what asl-tune's driver pays
    per_result = {
        key: {"first": sum(s[:w]) / (w * args.micro_epochs), "last": sum(s[-w:]) / (w * args.micro_epochs)} for key, s in seconds.items()
    }
    return {
        "trials": args.micro_trials,
        "epochs": args.micro_epochs,
        "window_trials": w,
        "cost_per_result_ms": {key: {k: v * 1000 for k, v in c.items()} for key, c in per_result.items()},
        "growth": {key: c["last"] / c["first"] for key, c in per_result.items()},
        "files_bytes": {"recorder": _sizes(folder), **{k: _sizes(work / "micro" / k) for k in storages}},
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mb": rss.mb,
        "tune_trial_kb": tune_trial_kb(min(args.micro_trials, 1000), args.epochs),
        "reading": reading(folder),
    }


# The peak is this process's own VmHWM, not getrusage's ru_maxrss: Linux carries a process's ru_maxrss across exec, and a
# child forked from this bench (2 GB after the micro bench) reported the bench's peak as its own (2,037 MiB, twice).
ANALYZE = """import json, sys, time
import asl_tune
t0 = time.perf_counter()
asl_tune.analyze(sys.argv[2], sys.argv[1], speed_on="training")
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"analyze_s": time.perf_counter() - t0, "peak_rss_mb": hwm / 1024}))
"""


def reading(folder: Path) -> dict:
    """The micro bench's folder read as a finished sweep's: read_trials on its parts, the driver's compaction, read_trials
    and asl_tune.load after it, then asl_tune.analyze in a process of its own (wall and peak RSS, speeds as trained)."""
    import asl_tune
    from asl_tune.results import compact, read_trials

    def timed(f) -> tuple[float, object]:
        t0 = time.perf_counter()
        out = f()
        return time.perf_counter() - t0, out

    figures = {"load_avg_before": os.getloadavg()}
    figures["read_trials_parts_s"], trials = timed(lambda: read_trials(folder))
    figures["compact_s"], changed = timed(lambda: compact(folder))
    figures["files_after_compaction"] = _sizes(folder)
    figures["read_trials_s"], after = timed(lambda: read_trials(folder))
    assert after.equals(trials), "compaction changed what read_trials reads"
    figures["load_s"], tables = timed(lambda: asl_tune.load(folder.name, folder.parent))
    figures["rows"] = {name: len(df) for name, df in tables._asdict().items()}
    say(
        f"reading: read_trials {figures['read_trials_parts_s']:.1f} s on parts, compaction {figures['compact_s']:.1f} s, read_trials {figures['read_trials_s']:.2f} s, load {figures['load_s']:.2f} s"
    )
    done = subprocess.run([sys.executable, "-c", ANALYZE, str(folder.parent), folder.name], capture_output=True, text=True)
    if done.returncode:
        say(f"reading: analyze failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else done.returncode}")
        figures["analyze_error"] = done.stderr[-2000:]
    else:
        out = json.loads(done.stdout.strip().splitlines()[-1])
        figures["analyze_s"], figures["analyze_peak_rss_mb"] = out["analyze_s"], out["peak_rss_mb"]
        say(f"reading: analyze {figures['analyze_s']:.1f} s, peak RSS {figures['analyze_peak_rss_mb']:.0f} MB")
    figures["load_avg_after"] = os.getloadavg()
    return figures


def tune_trial_kb(n: int, epochs: int) -> dict:
    """What Tune keeps of a trial in the driver for the whole sweep: n of its Trial objects fed a made-up trial's
    reports as Tune stores them (Trial.update_last_result: the last result and running statistics of each number),
    whole, and after asl-tune's DropRecordedParts; KB a trial of Python's heap (tracemalloc)."""
    import gc
    import tracemalloc

    from ray.tune.experiment import Trial

    from asl_tune.sweep.recorder import DropRecordedParts
    from asl_tune.sweep.space import load_space

    space_path = Path(tempfile.mkdtemp(prefix="asl-bench-space-")) / "scale.yaml"
    space_path.write_text(SPACE.format(epochs=epochs, sampler="tpe"))
    dropper = DropRecordedParts(load_space(space_path))
    shutil.rmtree(space_path.parent)
    out = {}
    for name, drop in (("whole", False), ("parts_dropped", True)):
        gc.collect()
        tracemalloc.start()
        trials = []
        for k in range(n):
            trial = Trial("bench", config={"lr": 0.001 * (1 + k % 100), "head_width": 16 << (k % 4)}, stub=True)
            for epoch in range(1, epochs + 1):
                result = {**made_up_epoch(trial.config, epoch, last=epoch == epochs), "training_iteration": epoch}
                if drop:
                    dropper.on_trial_result(epoch, [], trial, result)
                trial.update_last_result(result)
            trials.append(trial)
        gc.collect()
        out[name] = tracemalloc.get_traced_memory()[0] / n / 1024
        tracemalloc.stop()
        del trials
    return out


def _record_trial(recorder, trial: _Trial, epochs: int) -> float:
    """One trial through the recorder as Tune calls it (start, a result per epoch, complete), then a flush (get_state, as
    Tune saves its state): each trial's end written alone, as trials that last longer than the recorder's flush period are
    (the driver writes shorter ones together, results.ResultsStore.end_trial); its seconds."""
    t0 = time.perf_counter()
    recorder.on_trial_start(0, [], trial)
    for epoch in range(1, epochs + 1):
        trial.last_result = made_up_epoch(trial.config, epoch, last=epoch == epochs)
        recorder.on_trial_result(0, [], trial, trial.last_result)
    trial.finished = True
    with open(os.devnull, "w") as quiet, contextlib.redirect_stderr(quiet):  # the recorder's progress line, one per trial
        recorder.on_trial_complete(0, [], trial)
    recorder.get_state()
    return time.perf_counter() - t0


def _store_trial(study, trial: _Trial, epochs: int) -> float:
    """One trial through a study's storage as OptunaSearch drives it (ask, report per epoch, tell); its seconds."""
    import optuna

    t0 = time.perf_counter()
    storage, study_id = study._storage, study._study_id
    distributions = {
        "lr": optuna.distributions.FloatDistribution(0.001, 0.1, log=True),
        "head_width": optuna.distributions.CategoricalDistribution([16, 32, 64, 128]),
    }
    tid = storage.create_new_trial(study_id)
    for name, value in (("lr", trial.config["lr"]), ("head_width", trial.config["head_width"])):
        storage.set_trial_param(tid, name, distributions[name].to_internal_repr(value), distributions[name])
    for epoch in range(1, epochs + 1):
        storage.set_trial_intermediate_value(tid, epoch, made_up_epoch(trial.config, epoch)["val_accuracy"])
    storage.set_trial_state_values(tid, optuna.trial.TrialState.COMPLETE, [made_up_epoch(trial.config, epochs)["val_accuracy"]])
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if min(*args.sizes, args.epochs, args.micro_epochs, args.concurrency, args.cpus or 1) < 1 or args.micro_trials < 0:
        print("scale.py: --sizes, --epochs, --concurrency, --cpus and --micro-epochs must be >= 1, --micro-trials >= 0", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="asl-bench-scale-"))
    figures = {**machine(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        runs = {} if args.no_stack else bookkeeping(args, work) if args.bookkeeping else stack(args, work)
        micro_figures = micro(args, work) if args.micro_trials else None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ours, bare, by_hand = runs.get("asl_tune", {}), runs.get("bare_tune", {}), runs.get("tune_optuna", {})

    def ratio(a: dict, b: dict, per_result: bool = False) -> dict | None:
        if not (a and b):
            return None
        return {
            n: (a[n]["wall_s"] / (a[n]["results"] if per_result else 1)) / (b[n]["wall_s"] / (b[n]["results"] if per_result else 1))
            for n in args.sizes
        }

    figures.update(
        n_trials=args.sizes,
        epochs=args.epochs,
        settings=[s for s in SETTINGS if s in runs],
        asl_tune_wall_s=_each(ours, "wall_s"),
        bare_tune_wall_s=_each(bare, "wall_s"),
        ratio_vs_bare_tune=ratio(ours, bare),
        # ASHA stops trials early, so asl-tune's sweep runs fewer results than bare Tune's: the same ratio per result.
        ratio_per_result_vs_bare_tune=ratio(ours, bare, per_result=True),
        driver_cpu_s_per_result=_each(ours, "driver_cpu_s_per_result"),
        bare_tune_driver_cpu_s_per_result=_each(bare, "driver_cpu_s_per_result"),
        # Against Tune + OptunaSearch + ASHA wired by hand: what asl-tune adds beyond what TPE and ASHA cost anyone.
        tune_optuna_wall_s=_each(by_hand, "wall_s"),
        ratio_vs_tune_optuna=ratio(ours, by_hand),
        tune_optuna_driver_cpu_s_per_result=_each(by_hand, "driver_cpu_s_per_result"),
        # The recorder and the study's storage together, what the driver pays per result: last 100 trials / first 100.
        recorder_cost_growth=micro_figures["growth"]["recorder_and_study"] if micro_figures else None,
        # Tune's own memory a trial for the whole sweep, its result whole and as asl-tune leaves it (DropRecordedParts).
        tune_trial_kb=micro_figures["tune_trial_kb"] if micro_figures else None,
        # asl-tune's driver: the highest of its runs' peaks (and the micro bench's); the process's, runs of other settings included, beside it.
        driver_peak_rss_mb=max(
            [r["driver_peak_rss_mb"] for s in ("asl_tune", "asl_tune_mirror") for r in runs.get(s, {}).values()]
            + ([micro_figures["peak_rss_mb"]] if micro_figures else []),
            default=None,
        ),
        process_peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        runs=runs,
        micro=micro_figures,
    )
    if args.bookkeeping:
        figures.update(
            sampler=args.sampler,
            ray_cpus=args.cpus,  # None: the machine's own
            bookkeeping_ratio=_each(ours, "ratio"),
            bookkeeping_ratio_bare_tune=_each(bare, "ratio"),
        )
    if micro_figures:
        read = micro_figures["reading"]
        figures.update(
            read_trials_s=read["read_trials_s"],
            read_trials_parts_s=read["read_trials_parts_s"],
            compact_s=read["compact_s"],
            load_s=read["load_s"],
            analyze_s=read.get("analyze_s"),
            analyze_peak_rss_mb=read.get("analyze_peak_rss_mb"),
        )
    if "asl_tune_mirror" in runs:
        figures["mirror_wall_s"] = _each(runs["asl_tune_mirror"], "wall_s")
        figures["mirror_ratio_vs_bare_tune"] = ratio(runs["asl_tune_mirror"], bare)
    emit(figures, args.json)
    return 0


def _each(runs: dict, key: str) -> dict | None:
    return {n: run[key] for n, run in runs.items()} if runs else None


if __name__ == "__main__":
    sys.exit(main())
