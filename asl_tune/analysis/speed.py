"""Inference speed measured alone: each distinct architecture among a sweep's finished trials, timed once on
this machine with nothing else running in the process, and kept in the sweep folder's speed.parquet.

Each trial times itself once during training, in its first epoch, while other trials share its cores or
GPU: those figures say as much about its neighbours as about the network. Speed depends on the
architecture (head width, image size, number of classes), the device, its threads and the precision,
not on the weights, so one fresh DexNet per architecture is timed, set up as the trainer sets it up
(channels-last and autocast on a GPU), on random uint8 images through the trainer's Batcher: warm-up,
then a fixed number of batches of 64, timed in groups whose median rate is kept, and of single images
(`asl_tune.config.Timed`).

speed.parquet holds one row per (architecture, device_name, precision, threads); a second analyze on
the same machine finds its rows there and measures nothing. The number of classes is not a column of
trials.parquet: it is read from n_parameters, which grows by head_width // 2 + 1 per class (the last
Linear's weights and bias), so every trial that recorded its size names its whole architecture.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import platform
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from asl_tune.analysis.compute import Sweep, finished
from asl_tune.config import Timed
from asl_tune.errors import AslTuneError
from asl_tune.results import PARAM_PREFIX, read_snapshot, write_atomic

log = logging.getLogger(__name__)

SPEED_FILE = "speed.parquet"
DEVICES = ("cpu", "cuda")  # --speed-on values that measure alone
DURING_TRAINING = "training"  # --speed-on value that keeps the figures the trials took during training
ARCHITECTURE = ["head_width", "image_size", "num_classes"]
KEY = [*ARCHITECTURE, "device_name", "precision", "threads"]  # one speed.parquet row per key
FIGURES = ["infer_img_per_s", "latency_ms_p50", "latency_ms_p95", "keeps_up_30fps"]
UNDER_LOAD = "under_load_"  # prefix of the trials' own figures once the speed columns hold those measured alone


@dataclass(frozen=True)
class SpeedOn:
    """Where analyze measures speed alone, and how much."""

    device: str  # "cpu" or "cuda"
    threads: int | None = None  # torch CPU threads; None: torch's default on this machine
    timed: Timed = Timed()  # warm-up and timed runs per architecture


def speed_on(device: str, threads: int | None = None, timed: Timed = Timed()) -> SpeedOn | None:
    """--speed-on and --threads checked: a SpeedOn, or None for the figures taken during training; each mistake is one AslTuneError line."""
    if device not in (*DEVICES, DURING_TRAINING):
        raise AslTuneError(f"--speed-on: must be cpu, cuda or {DURING_TRAINING}, got {device!r}")
    if threads is not None and threads < 1:
        raise AslTuneError(f"--threads: must be >= 1, got {threads}")
    if device == DURING_TRAINING:
        if threads is not None:
            raise AslTuneError(
                f"--threads: applies to --speed-on cpu or cuda only, got --threads {threads} with --speed-on {DURING_TRAINING}"
            )
        return None
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise AslTuneError("--speed-on: cuda needs a GPU that torch can see, and it sees none, got 'cuda'")
    return SpeedOn(device, threads, timed)


def cpu_name() -> str:
    """This machine's processor model (/proc/cpuinfo's model name where there is one), as `cpu: <model>`."""
    try:
        with open("/proc/cpuinfo") as f:
            models = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    except OSError:
        models = []
    return f"cpu: {models[0] if models else (platform.processor() or platform.machine())}"


def _setting(on: SpeedOn) -> dict:
    """The key columns that are not the architecture: device_name, precision and threads of this machine."""
    import torch

    from asl_tune.train import device_name, pick_precision

    device = torch.device(on.device)
    name = device_name(device) if on.device == "cuda" else cpu_name()
    return {"device_name": name, "precision": pick_precision(device), "threads": int(on.threads or torch.get_num_threads())}


# ---------------------------------------------------------------------------------------------
# Architectures


@functools.cache
def _parameters_for_one_class(head_width: int, image_size: int) -> int:
    from asl_tune.model import DexNet, count_parameters

    return count_parameters(DexNet(head_width, image_size, 1))


def classes_from_parameters(head_width: int, image_size: int, n_parameters: int) -> int | None:
    """The number of classes of a DexNet with this head width, image size and parameter count; None when no number fits."""
    per_class = head_width // 2 + 1  # the last Linear's weights and bias, per class
    extra, rest = divmod(int(n_parameters) - _parameters_for_one_class(head_width, image_size), per_class)
    return 1 + extra if rest == 0 and extra >= 0 else None


def architectures(trials: pd.DataFrame) -> pd.DataFrame:
    """trial_id, head_width, image_size, num_classes of every finished trial; one line of AslTuneError for a trial that does not say."""
    done = finished(trials)
    columns = [PARAM_PREFIX + "head_width", PARAM_PREFIX + "image_size", "n_parameters"]
    rows = []
    for _, row in done.iterrows():
        values = [row.get(c) for c in columns]
        classes = classes_from_parameters(int(values[0]), int(values[1]), int(values[2])) if all(pd.notna(v) for v in values) else None
        if classes is None:
            raise AslTuneError(
                f"--speed-on: trial {row['trial_id']} does not record its architecture ({', '.join(columns)}: {', '.join(map(str, values))}); "
                f"--speed-on {DURING_TRAINING} uses the figures it took during training"
            )
        rows.append((row["trial_id"], int(values[0]), int(values[1]), classes))
    return pd.DataFrame(rows, columns=["trial_id", *ARCHITECTURE])


# ---------------------------------------------------------------------------------------------
# Measuring


def measure_alone(head_width: int, image_size: int, num_classes: int, on: SpeedOn) -> dict:
    """One architecture's infer_img_per_s, latency_ms_p50/p95 and keeps_up_30fps, timed alone on on.device at on.threads."""
    import torch

    from asl_tune.data import Batcher
    from asl_tune.evaluate import measure_speed
    from asl_tune.model import DexNet
    from asl_tune.train import AUTOCAST, pick_precision

    device = torch.device(on.device)
    on_gpu = device.type == "cuda"
    before = torch.get_num_threads()
    torch.set_num_threads(int(on.threads or before))
    try:
        torch.manual_seed(0)
        model = DexNet(head_width, image_size, num_classes).to(device)
        if on_gpu:  # as the trainer sets up a GPU trial
            model = model.to(memory_format=torch.channels_last)
            torch.backends.cudnn.benchmark = True
        images = np.random.default_rng(0).integers(0, 256, size=(64, image_size, image_size, 3), dtype=np.uint8)  # (64, S, S, 3)
        batcher = Batcher(images, device, channels_last=on_gpu)
        if on_gpu:
            batcher.to_device()  # the images stay on the GPU: the network is timed, not the bus
        return measure_speed(model, batcher, np.arange(64), autocast=AUTOCAST[pick_precision(device)], timed=on.timed)
    finally:
        torch.set_num_threads(before)


def speed_table(sweep: Sweep, on: SpeedOn) -> pd.DataFrame:
    """speed.parquet's rows for every architecture among the finished trials on this machine's setting, measuring only those it lacks."""
    path = sweep.folder / SPEED_FILE
    cache = read_snapshot(path) if path.exists() else pd.DataFrame(columns=KEY)
    setting = _setting(on)
    wanted = architectures(sweep.trials)[ARCHITECTURE].drop_duplicates().sort_values(ARCHITECTURE)
    for arch in wanted.to_dict("records"):
        key = {**arch, **setting}
        if _rows(cache, key).empty:
            log.info(
                "measuring DexNet head %d, %d px, %d classes alone on %s, threads %d",
                arch["head_width"],
                arch["image_size"],
                arch["num_classes"],
                setting["device_name"],
                setting["threads"],
            )
            figures = measure_alone(arch["head_width"], arch["image_size"], arch["num_classes"], on)
            row = {
                **key,
                **figures,
                **dataclasses.asdict(on.timed),
                "hostname": platform.node(),
                "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "load_avg_1min": _load(),
            }
            cache = pd.DataFrame([row]) if cache.empty else pd.concat([cache, pd.DataFrame([row])], ignore_index=True)
            write_atomic(cache, path)  # after each one: an interrupted analyze keeps what it measured
    return pd.concat([_rows(cache, {**arch, **setting}) for arch in wanted.to_dict("records")], ignore_index=True)


def _load() -> float:
    """The machine's 1-minute load average (NaN where the OS has none): other processes slow a figure "alone" in its process too."""
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else float("nan")


def _rows(cache: pd.DataFrame, key: dict) -> pd.DataFrame:
    """The rows of speed.parquet that match every column of key."""
    match = np.ones(len(cache), dtype=bool)
    for column, value in key.items():
        match &= (cache[column] == value).to_numpy(dtype=bool) if column in cache.columns else False
    return cache[match]


# ---------------------------------------------------------------------------------------------
# The sweep's speed axis


def with_speed_alone(trials: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """A copy whose speed columns hold the figures measured alone (NaN for unfinished trials), the trials' own kept as under_load_<name>."""
    figures = architectures(trials).merge(table[ARCHITECTURE + FIGURES], on=ARCHITECTURE, how="left").set_index("trial_id")
    out = trials.copy()
    for column in FIGURES:
        out[UNDER_LOAD + column] = out[column]
        out[column] = out["trial_id"].map(figures[column])
    out["keeps_up_30fps"] = out["keeps_up_30fps"].astype(object)
    return out


def _machine_load(table: pd.DataFrame) -> str:
    """The load the machine had while these figures were measured: another process on its cores slows them too."""
    loads = pd.to_numeric(table.get("load_avg_1min", pd.Series(dtype=float)), errors="coerce").dropna()
    if loads.empty:
        return "the machine's load not recorded"
    span = f"{loads.min():.2f}" if loads.min() == loads.max() else f"{loads.min():.2f} to {loads.max():.2f}"
    return f"with a 1-minute load average of {span} on {os.cpu_count()} cores"


def use_speed(sweep: Sweep, on: SpeedOn | None) -> Sweep:
    """The sweep with the speed figures the analysis is to use, and the words that say which ones they are."""
    if on is None:
        devices = ", ".join(sorted(str(d) for d in finished(sweep.trials)["device"].dropna().unique())) or "unrecorded"
        return dataclasses.replace(
            sweep,
            speed_label="measured during training, under load",
            speed_note=(
                f"measured during training, under load: each trial timed itself once, in its first epoch, on its own device ({devices}) "
                "with its --cpus-per-trial threads, while other trials shared the machine, so one architecture's figures vary between trials"
            ),
        )
    table = speed_table(sweep, on)
    setting = _setting(on)
    threads = f"{setting['threads']} thread{'' if setting['threads'] == 1 else 's'}"
    return dataclasses.replace(
        sweep,
        trials=with_speed_alone(sweep.trials, table),
        speed_label=f"measured alone on {setting['device_name']}, {threads}, {setting['precision']}",
        speed_note=(
            f"measured alone on {setting['device_name']} ({threads}, {setting['precision']}) by asl-tune analyze: each of the "
            f"{len(table)} architectures once, {on.timed.warmup} warm-up runs, then {on.timed.batches} timed batches of 64 (in {on.timed.rounds} groups, the median group's rate kept) and "
            f"{on.timed.latencies} single images (`{SPEED_FILE}`), {_machine_load(table)}; the figures the trials took during "
            f"training, under load, are the {UNDER_LOAD}* columns"
        ),
    )
