"""Everything GPU-related in one short run: a real `asl-tune sweep` of the 87,000-image shape packed four to
a GPU (--gpus-per-trial 0.25), the trainer's speed in each precision mode, the seed's input pipeline on the
same GPU, the compute bound (FLOPs, a bf16 matmul, MFU), several trainers packed on one GPU. One JSON
object at the end.

    python bench/gpu.py --json --out gpu.json        # on a machine with one GPU: about 7 minutes on an H100 (estimated)
    python bench/gpu.py --smoke --json               # every section at tiny sizes on the CPU (tests run this)

The full-size sweep (section fullsize_sweep, first, so a run cut short still has it) builds bench/fullsize.py's
stand-in (the synthetic renderer's frames hard-linked to 29 x 3,000 Kaggle names), decodes it at 200 px
with every core, trains one trial alone in this process (one trainer's steady img/s), then runs
`asl-tune sweep` as a child process: --fullsize-trials trials of --fullsize-epochs epochs, batch 64, head
512, data_fraction drawn uniformly from 0.2-1.0 (random sampler: a predictable budget), four at once on the
GPU. Meanwhile it samples the GPU's utilisation (nvidia-smi, once a second) and each trial worker's
private memory (fullsize.Sampler). Its top-level keys are under "fullsize_sweep".

Sections that need CUDA say so ({"skipped": "..."}) when there is none; a section that fails records
its error and the others still run, so one bad section never costs the whole (rare) GPU session.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from harness import emit, machine, say, synthetic_dataset

FULLSIZE_SECTION = "fullsize_sweep"
# The sections in their default order: what a GPU session needs most first.
SECTIONS = (FULLSIZE_SECTION, "trainer", "compute", "profile", "packing", "seed")

MODES = ("fp32", "bf16", "bf16_channels_last", "bf16_channels_last_compile")
SEED_GPU_TRAIN_IMG_PER_S = (200, 340)  # the seed: 10 epochs of 60,900 images in 30-50 minutes on a Kaggle GPU
SEED_GPU_INFER_IMG_PER_S = 916


@dataclass(frozen=True)
class Sizes:
    """How big each section runs: the real run, or --smoke."""

    image_size: int
    head_width: int
    per_class: int  # synthetic images per class rendered for the run
    batches: tuple[int, ...]  # training batch sizes of the trainer section
    steps: int  # timed training steps per mode
    warmup: int  # untimed training steps first (compiling, in compile mode)
    seed_workers: tuple[int, ...]  # DataLoader workers of the seed's pipeline
    pack_seconds: float  # how long each packed trainer trains
    packs: tuple[int, ...]  # how many trainers share the device at once
    trainer_epochs: int
    matmul: int  # side of the square bf16 matmul
    compile_batches: tuple[int, ...]  # batch sizes at which torch.compile is measured (about 45 s of compiling each on an H100)
    fullsize_per_class: int  # names per class in the full-size stand-in (3,000: the Kaggle set's 87,000)
    fullsize_trials: int
    fullsize_epochs: int
    fullsize_alone_fraction: float  # data_fraction of the trial trained alone for one trainer's steady img/s
    fullsize_alone_runs: int  # 1: that trial; 3: then two more in the warm process (same shapes; a new last batch)
    fullsize_timeout_s: float  # the sweep is stopped (SIGTERM: Tune ends its trials, the recorder keeps their rows) after this
    smoke: bool = False


REAL = Sizes(
    image_size=200,
    head_width=512,
    per_class=100,
    batches=(64, 256),
    steps=120,
    warmup=5,
    seed_workers=(0, 8),
    pack_seconds=10.0,
    packs=(1, 4),
    trainer_epochs=5,
    matmul=8192,
    compile_batches=(256,),
    fullsize_per_class=3000,
    fullsize_trials=16,
    fullsize_epochs=3,
    fullsize_alone_fraction=0.15,
    fullsize_alone_runs=3,
    fullsize_timeout_s=240,
)
# The smoke run goes through every section's code on the CPU, packing and the sweep included (without GPUs).
SMOKE = Sizes(
    image_size=32,
    head_width=16,
    per_class=6,
    batches=(8,),
    steps=2,
    warmup=1,
    seed_workers=(0,),
    pack_seconds=1.0,
    packs=(2,),
    trainer_epochs=1,
    matmul=256,
    compile_batches=(8,),
    fullsize_per_class=12,
    fullsize_trials=2,
    fullsize_epochs=2,
    fullsize_alone_fraction=1.0,
    fullsize_alone_runs=1,
    fullsize_timeout_s=300,
    smoke=True,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--smoke", action="store_true", help="tiny sizes on whatever device there is; CUDA-only sections report themselves skipped"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument(
        "--sections", default=",".join(SECTIONS), help=f"comma-separated sections to run, in this order (default {','.join(SECTIONS)})"
    )
    p.add_argument(
        "--fullsize-trials", type=int, help=f"trials of the full-size sweep (default {REAL.fullsize_trials}; smoke {SMOKE.fullsize_trials})"
    )
    p.add_argument("--fullsize-epochs", type=int, help=f"epochs of each full-size trial (default {REAL.fullsize_epochs})")
    p.add_argument(
        "--fullsize-per-class",
        type=int,
        help=f"names per class of the full-size stand-in (default {REAL.fullsize_per_class}: 87,000 images)",
    )
    p.add_argument(
        "--fullsize-timeout",
        type=float,
        help=f"seconds after which the full-size sweep is stopped, its finished trials kept (default {REAL.fullsize_timeout_s:.0f})",
    )
    p.add_argument("--pack-worker", action="store_true", help=argparse.SUPPRESS)  # one packed trainer (run by the packing section)
    p.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=REAL.image_size, help=argparse.SUPPRESS)
    p.add_argument("--head-width", type=int, default=REAL.head_width, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if unknown := [name for name in args.sections.split(",") if name not in SECTIONS]:
        p.error(f"--sections: must be among {', '.join(SECTIONS)}, got {', '.join(unknown)}")
    return args


def _device():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(section: str, run) -> dict:
    """Run one section; its figures with its wall time, or its error (the other sections still run)."""
    say(f"section {section}")
    start = time.perf_counter()
    try:
        figures = run()
    except Exception as e:  # one broken section must not cost the whole GPU session
        figures = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
    figures["section_s"] = round(time.perf_counter() - start, 2)
    return figures


# ------------------------------------------------------------------ trainer: precision modes


def _mode_model(mode: str, head_width: int, image_size: int, classes: int, device):
    """DexNet set up for one mode: (model, optimiser, autocast?, channels_last?)."""
    import torch

    from asl_tune.model import DexNet

    torch.manual_seed(0)
    bf16 = mode != "fp32"
    channels_last = "channels_last" in mode
    model = DexNet(head_width, image_size, classes).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.008)
    if mode.endswith("compile"):
        model = torch.compile(model)
    return model, opt, bf16, channels_last


def _train_steps(model, opt, batcher, labels, rows, batch: int, steps: int, bf16: bool) -> float:
    """img/s of `steps` training steps on batches drawn from rows (after the caller's warm-up)."""
    import torch

    device = batcher.device
    gen = torch.Generator().manual_seed(1)
    model.train()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        pick = rows[torch.randint(len(rows), (batch,), generator=gen)]
        x, y = batcher.batch(pick), labels[pick.to(device)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    _sync(device)
    return batch * steps / (time.perf_counter() - start)


def _one_mode(mode: str, batch: int, ds, sizes: Sizes, device) -> dict:
    """Training img/s, batch-64 inference img/s and batch-1 latency of DexNet in one precision mode."""
    import torch

    from asl_tune.data import Batcher
    from asl_tune.evaluate import measure_speed

    model, opt, bf16, channels_last = _mode_model(mode, sizes.head_width, sizes.image_size, len(ds.classes), device)
    batcher = Batcher(ds.images, device, channels_last=channels_last)
    if device.type == "cuda":
        batcher.to_device()
    labels = torch.from_numpy(ds.labels).to(device)
    rows = torch.arange(len(ds.labels))
    start = time.perf_counter()
    _train_steps(model, opt, batcher, labels, rows, batch, sizes.warmup, bf16)  # compiles in compile mode
    warm_s = time.perf_counter() - start
    figures = {"train_img_per_s": _train_steps(model, opt, batcher, labels, rows, batch, sizes.steps, bf16)}
    if bf16 and device.type != "cuda" and sizes.smoke:
        # A CPU without bf16 units runs autocast at a few img/s: the smoke run checks the steps, not these speeds.
        figures["infer_img_per_s"] = None
        return figures
    figures.update(
        {
            k: v
            for k, v in measure_speed(model, batcher, rows.numpy(), autocast=torch.bfloat16 if bf16 else None).items()
            if k != "keeps_up_30fps"
        }
    )
    if mode.endswith("compile"):
        figures["compile_s"] = warm_s  # first steps, tracing and compiling included
    return figures


def trainer_section(ds, sizes: Sizes, device, smoke: bool) -> dict:
    """Each mode at each batch size, then the trainer itself (asl_tune.train.train_trial) for one epoch."""
    from asl_tune.config import TrialConfig
    from asl_tune.train import train_trial

    out: dict = {"modes": {}}
    for batch in sizes.batches:
        for mode in MODES:
            if mode.endswith("compile") and device.type != "cuda":
                out["modes"][f"{mode}@{batch}"] = {
                    "skipped": "torch.compile is measured on CUDA only (minutes of C++ compilation on a CPU)"
                }
                continue
            if mode.endswith("compile") and batch not in sizes.compile_batches:
                out["modes"][f"{mode}@{batch}"] = {
                    "skipped": f"torch.compile is measured at batch {', '.join(map(str, sizes.compile_batches))} only (its compiling costs the GPU's minutes)"
                }
                continue
            say(f"trainer: {mode} at batch {batch}")
            out["modes"][f"{mode}@{batch}"] = _timed(f"{mode}@{batch}", lambda: _one_mode(mode, batch, ds, sizes, device))
    for batch in sizes.batches:
        say(f"trainer: asl_tune.train.train_trial at batch {batch}")
        config = TrialConfig(
            head_width=sizes.head_width, image_size=sizes.image_size, epochs=sizes.trainer_epochs, batch_size=batch, dropout=0.5, lr=0.008
        )
        result = train_trial(config, ds, device=device)
        suffix = "" if batch == sizes.batches[0] else f"_at_{batch}"
        # The trial's average includes its first epoch (cuDNN's kernel search); the last epoch is the steady state.
        out[f"trainer_train_img_per_s{suffix}"] = result.epochs[-1]["train_img_per_s"]
        out[f"trainer_epoch_img_per_s{suffix}"] = [e["train_img_per_s"] for e in result.epochs]
        out[f"trainer_trial_avg_img_per_s{suffix}"] = result.final["train_img_per_s"]
        out[f"trainer_infer_img_per_s{suffix}"] = result.final["infer_img_per_s"]
        out[f"trainer_latency_ms_p50{suffix}"] = result.final.get("latency_ms_p50")
    out["trainer_precision"] = result.final.get("precision")
    out["trainer_device"] = result.final.get("device")
    return out


# ------------------------------------------------------------------ the seed's pipeline


def seed_section(data: Path, ds, sizes: Sizes, device) -> dict:
    """The seed's ImageFolder + PIL + transforms, every epoch, with 0 DataLoader workers (the seed's) and more."""
    from data_path import Setup, seed_pipeline_throughput

    setup = Setup(sizes.image_size, sizes.head_width, sizes.batches[0], 0.008, 1, None, 0)
    return {f"workers_{w}": seed_pipeline_throughput(setup, data, len(ds.labels), len(ds.classes), w, device) for w in sizes.seed_workers}


# ------------------------------------------------------------------ compute bound


def compute_section(ds, sizes: Sizes, device) -> dict:
    """FLOPs per training image (forward and backward, counted), and a bf16 matmul's TFLOP/s on this device."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from asl_tune.model import DexNet

    model = DexNet(sizes.head_width, sizes.image_size, len(ds.classes)).to(device)
    x = torch.randn(8, 3, sizes.image_size, sizes.image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x).float().logsumexp(1).sum().backward()
    out = {"flops_per_train_image": counter.get_total_flops() / 8}
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x)
    out["flops_per_infer_image"] = counter.get_total_flops() / 8
    if device.type != "cuda":
        out["matmul_bf16_tflops"] = {"skipped": "needs CUDA"}
        return out
    n = sizes.matmul
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(device)
    reps, start = 20, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(device)
    out["matmul_bf16_tflops"] = 2 * n**3 * reps / (time.perf_counter() - start) / 1e12
    return out


def profile_section(ds, sizes: Sizes, device) -> dict:
    """The top kernels (GPU) or operators (CPU) of bf16 + channels_last training steps at the largest batch."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from asl_tune.data import Batcher

    batch = sizes.batches[-1]
    model, opt, bf16, channels_last = _mode_model("bf16_channels_last", sizes.head_width, sizes.image_size, len(ds.classes), device)
    batcher = Batcher(ds.images, device, channels_last=channels_last)
    if device.type == "cuda":
        batcher.to_device()
    labels = torch.from_numpy(ds.labels).to(device)
    rows = torch.arange(len(ds.labels))
    _train_steps(model, opt, batcher, labels, rows, batch, sizes.warmup, bf16)
    on_gpu = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA] if on_gpu else [ProfilerActivity.CPU]) as prof:
        _train_steps(model, opt, batcher, labels, rows, batch, max(2, sizes.steps // 10), bf16)
    attr = "self_device_time_total" if on_gpu else "self_cpu_time_total"
    events = [(e.key, getattr(e, attr, 0) or 0, e.count) for e in prof.key_averages()]
    events = [e for e in events if e[1] > 0]
    total = sum(t for _, t, _ in events) or 1
    top = sorted(events, key=lambda e: -e[1])[:12]
    return {
        "batch": batch,
        "measure": attr,
        "total_ms": total / 1000,
        "top": [{"name": k[:140], "ms": t / 1000, "share": t / total, "calls": c} for k, t, c in top],
    }


# ------------------------------------------------------------------ packing trainers on one GPU


def pack_worker(args: argparse.Namespace) -> int:
    """One packed trainer: its share's data placement, bf16 + channels_last steps for --seconds; one JSON line."""
    import numpy as np
    import torch

    from asl_tune.data import Batcher
    from asl_tune.model import DexNet
    from asl_tune.train import keeps_on_device

    device = _device()
    images = np.random.default_rng(0).integers(0, 255, size=(2048, args.image_size, args.image_size, 3), dtype=np.uint8)
    labels = torch.from_numpy(np.random.default_rng(1).integers(0, 29, size=2048)).to(device)
    batcher = Batcher(images, device, channels_last=True)
    if device.type == "cuda" and keeps_on_device(images.nbytes, torch.cuda.get_device_properties(device).total_memory, args.share):
        batcher.to_device()  # the trainer's rule for a trial's share of the card
    model = DexNet(args.head_width, args.image_size, 29).to(device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.008)
    rows = torch.arange(len(images))
    on_gpu = device.type == "cuda"
    batch, steps = (64, 20) if on_gpu else (8, 1)
    _train_steps(model, opt, batcher, labels, rows, batch, 5 if on_gpu else 1, on_gpu)
    seen, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        _train_steps(model, opt, batcher, labels, rows, batch, steps, on_gpu)
        seen += batch * steps
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if on_gpu else None
    print(json.dumps({"img_per_s": seen / (time.perf_counter() - start), "peak_memory_mb": peak}))
    return 0


def packing_section(sizes: Sizes, device) -> dict:
    """1, 2 and 4 trainer processes on the one GPU at once: aggregate and per-trial img/s, peak memory."""
    out = {}
    for k in sizes.packs:
        say(f"packing: {k} trainer(s) on one GPU")
        command = [
            sys.executable,
            __file__,
            "--pack-worker",
            "--share",
            str(1 / k),
            "--seconds",
            str(sizes.pack_seconds),
            "--image-size",
            str(sizes.image_size),
            "--head-width",
            str(sizes.head_width),
        ]
        procs = [
            subprocess.Popen(
                command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}
            )
            for _ in range(k)
        ]
        each = [json.loads(p.communicate(timeout=sizes.pack_seconds * 10 + 120)[0].strip().splitlines()[-1]) for p in procs]
        out[str(k)] = {
            "aggregate_img_per_s": sum(e["img_per_s"] for e in each),
            "per_trial_img_per_s": [e["img_per_s"] for e in each],
            "peak_memory_mb": [e["peak_memory_mb"] for e in each],
        }
    return out


# ------------------------------------------------------------------ a real sweep at the full-size shape


class BusySampler:
    """The GPU's utilisation (the share of the last sample period in which a kernel ran), about once a second, each
    sample with its unix time: nvidia-smi's own loop (the GPU image has it), else torch.cuda.utilization (NVML, needs pynvml)."""

    def __init__(self, device):
        self.samples: list[tuple[float, float, float | None]] = []  # (unix time, busy %, memory used MiB)
        self.how = None
        self._stop = threading.Event()
        self._proc = None
        self._thread = None
        if device.type != "cuda":
            return
        if shutil.which("nvidia-smi"):
            self.how = "nvidia-smi"
            index = str(torch_device_index(device))
            # Its own timestamp on each line: a pipe may hold lines back, so the time they are read is not the time they say.
            self._proc = subprocess.Popen(
                [
                    "nvidia-smi",
                    "-i",
                    index,
                    "--query-gpu=timestamp,utilization.gpu,memory.used",
                    "--format=csv,noheader,nounits",
                    "-lms",
                    "1000",
                ],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
            )
            self._thread = threading.Thread(target=self._read_smi, daemon=True)
        else:
            self.how = "torch.cuda.utilization"
            self._thread = threading.Thread(target=self._poll_nvml, args=(device,), daemon=True)

    def __enter__(self) -> BusySampler:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _read_smi(self) -> None:
        from datetime import datetime

        for line in self._proc.stdout:
            parts = [v.strip() for v in line.split(",")]
            try:
                busy, used = float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                continue  # "[N/A]" or a header
            try:  # "2026/11/27 07:33:53.123", the machine's local time, as time.time() counts it
                stamp = datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
            except ValueError:
                stamp = time.time()
            self.samples.append((stamp, busy, used))

    def _poll_nvml(self, device) -> None:
        import torch

        while not self._stop.wait(1.0):
            try:
                self.samples.append((time.time(), float(torch.cuda.utilization(device)), None))
            except Exception as e:  # no pynvml: say so once, sample nothing
                self.how = f"none: {type(e).__name__}: {e}"
                return

    def share(self, start: float, end: float) -> tuple[float | None, int]:
        """Mean busy share over the samples stamped in [start, end], and how many there were."""
        inside = [b for t, b, _ in self.samples if start <= t <= end]
        return (sum(inside) / len(inside) / 100, len(inside)) if inside else (None, 0)


def torch_device_index(device) -> int:
    import torch

    return device.index if device.index is not None else torch.cuda.current_device()


def _stamps(values) -> list[float]:
    """trials.parquet's started_at / ended_at (ISO 8601, UTC, the driver's clock) as unix seconds."""
    import pandas as pd

    return [pd.Timestamp(v).timestamp() for v in values if isinstance(v, str) and v]


def _alone(ds, sizes: Sizes, device, cpus: int, share: float) -> dict:
    """One trainer alone, in this process, as a sweep trial trains (same threads, same GPU share): its epochs' img/s.

    Then twice more in the same (now warm) process, as a reused Tune worker would run its next trials: the
    same data_fraction (every batch shape seen before) and a slightly smaller one (a new last, partial batch).
    If only the latter's first epoch is slow, a trial's cold start is cuDNN timing the new shape
    (cudnn.benchmark), not CUDA's start; on the CPU the three are alike.
    """
    import gc

    import torch

    from asl_tune.config import TrialConfig
    from asl_tune.train import train_trial

    out: dict = {}
    threads = torch.get_num_threads()  # train_trial sets the trial's; the later sections run with this process's own
    base = TrialConfig(
        head_width=sizes.head_width,
        image_size=ds.image_size,
        epochs=2,
        batch_size=64,
        dropout=0.0,
        momentum=0.9,
        lr=0.01,
        data_fraction=sizes.fullsize_alone_fraction,
    )
    runs = (("one", base), ("warm_same_shapes", base), ("warm_new_last_batch", _new_last_batch(base, ds)))
    for label, config in runs[: sizes.fullsize_alone_runs]:
        result = train_trial(config, ds, threads=cpus, device=device, gpu_share=share)
        out[f"{label}_epoch_img_per_s"] = [e["train_img_per_s"] for e in result.epochs]
        out[f"{label}_last_batch"] = result.epochs[0]["images_seen"] % 64 or 64
        out[f"{label}_data_fraction"] = config.data_fraction
        del result
        gc.collect()  # the trial's arrays (on an H200 its copy of the data on the GPU) go before the next
    torch.set_num_threads(threads)
    out["one_steady_img_per_s"] = out["one_epoch_img_per_s"][-1]
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the sweep's trials get the card
    return out


def _new_last_batch(config, ds):
    """config with a slightly smaller data_fraction whose last training batch has another size (a shape cuDNN has not timed)."""
    from asl_tune.data import make_splits, subsample

    train = make_splits(ds.labels, ds.frames, config.split, config.split_seed).train

    def last(fraction: float) -> int:
        return len(subsample(train, ds.labels, fraction, config.seed)) % config.batch_size

    fraction = config.data_fraction
    while fraction > 0.02 and last(fraction) == last(config.data_fraction):
        fraction *= 0.97
    return dataclasses.replace(config, data_fraction=fraction)


def fullsize_sweep_section(sizes: Sizes, device, work: Path) -> dict:
    """The 87,000-image shape: stand-in, decode, one trainer alone, then a packed `asl-tune sweep` measured from outside."""
    import tempfile

    on_gpu = device.type == "cuda"
    # 4 trials x 3 threads on 16 cores: 4 left for the driver, Ray and this process
    cpus = max(1, min(3, (os.cpu_count() or 1) // 4)) if on_gpu else 1
    # --max-concurrent wraps the searcher in a ConcurrencyLimiter, and Tune then keeps that many trials pending (one without)
    share, at_once = (0.25, 4) if on_gpu else (1.0, 2)
    out: dict = {
        "n_trials": sizes.fullsize_trials,
        "epochs": sizes.fullsize_epochs,
        "image_size": sizes.image_size,
        "head_width": sizes.head_width,
        "gpus_per_trial": share if on_gpu else 0,
        "cpus_per_trial": cpus,
        "max_concurrent": at_once,
    }
    t0 = time.perf_counter()
    # Beside the other sections' rendered frames, which it hard-links: a link cannot cross file systems (the cache's and /tmp's may differ).
    links = Path(tempfile.mkdtemp(prefix="fullsize-standin-", dir=synthetic_dataset(sizes.per_class).parent))
    try:
        return _fullsize_sweep(links, sizes, device, work, out, t0)
    finally:
        shutil.rmtree(links, ignore_errors=True)


def _fullsize_sweep(links: Path, sizes: Sizes, device, work: Path, out: dict, t0: float) -> dict:
    """fullsize_sweep_section's body: the stand-in in links, the decode, the trainers alone, the sweep; figures into out."""
    import contextlib
    import math
    import signal
    import statistics

    import yaml
    from fullsize import Sampler, build_standin, distinct_files

    from asl_tune.data import load_dataset
    from asl_tune.results import read_epochs, read_trials

    cpus, share, at_once = out["cpus_per_trial"], out["gpus_per_trial"] or 1.0, out["max_concurrent"]
    data, n = build_standin(links, sizes.fullsize_per_class, sizes.per_class)  # the other sections' rendered frames, hard-linked
    out.update(n_images=n, distinct_jpegs=distinct_files(data), standin_s=time.perf_counter() - t0)
    say(f"{FULLSIZE_SECTION}: {n:,} names ({out['distinct_jpegs']} frames) in {out['standin_s']:.1f} s; decoding at {sizes.image_size} px")
    t0 = time.perf_counter()
    ds = load_dataset(data, sizes.image_size, progress=False, workers=os.cpu_count() or 1)  # the sweep finds this cache warm
    out.update(decode_s=time.perf_counter() - t0, decoded_gb=ds.images.nbytes / 1e9)
    say(f"{FULLSIZE_SECTION}: decoded {ds.images.nbytes / 1e9:.1f} GB in {out['decode_s']:.1f} s; one trainer alone")
    t0 = time.perf_counter()
    out.update(_alone(ds, sizes, device, cpus, share), alone_s=time.perf_counter() - t0)
    del ds

    name = "fullsize-sweep"
    space = work / f"{name}.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "name": name,
                "metric": "val_accuracy",
                "mode": "max",
                "num_samples": sizes.fullsize_trials,
                "early_stopping": False,
                "sampler": "random",
                "fixed": {
                    "image_size": sizes.image_size,
                    "batch_size": 64,
                    "epochs": sizes.fullsize_epochs,
                    "head_width": sizes.head_width,
                    "momentum": 0.9,
                    "dropout": 0.0,
                },
                "params": {
                    "data_fraction": {"type": "float", "low": 0.2, "high": 1.0},
                    "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True},
                },
            },
            sort_keys=False,
        )
    )
    cmd = [
        sys.executable,
        "-m",
        "asl_tune",
        "sweep",
        "--space",
        str(space),
        "--data",
        str(data),
        "--results",
        str(work / "results"),
        "--name",
        name,
        "--gpus-per-trial",
        str(out["gpus_per_trial"]),
        "--cpus-per-trial",
        str(cpus),
        "--max-concurrent",
        str(at_once),
    ]
    say(f"{FULLSIZE_SECTION}: {' '.join(cmd[2:])}")
    log = work / f"{name}.log"
    start, stopped = time.perf_counter(), False
    with open(log, "w") as sink:
        proc = subprocess.Popen(
            cmd, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
        )
        try:
            with Sampler(proc.pid) as memory, BusySampler(device) as busy:
                try:
                    proc.wait(timeout=sizes.fullsize_timeout_s)
                except subprocess.TimeoutExpired:  # out of the GPU's minutes: stop it as a user would; the finished trials' rows stay
                    stopped = True
                    proc.send_signal(signal.SIGTERM)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=60)  # else killed below
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    out.update(
        exit_status=proc.returncode,
        stopped_at_timeout=stopped,
        wall_s=time.perf_counter() - start,
        gpu_sampler=busy.how,
        log_tail=log.read_text()[-3000:],
    )
    folder = work / "results" / name
    trials = read_trials(folder) if (folder / "trials.parquet").exists() else None
    if trials is None or not len(trials):
        return out
    epochs = read_epochs(folder)
    starts, ends = _stamps(trials["started_at"]), _stamps(trials["ended_at"])
    span = (max(ends) - min(starts)) if starts and ends else None
    images = float(trials["images_seen"].fillna(0).sum())
    per_trial = []
    for _, row in trials.iterrows():
        rates = list(epochs[epochs["trial_id"] == row["trial_id"]].sort_values("epoch")["train_img_per_s"])
        steady = statistics.median(rates[1:]) if len(rates) >= 2 else None  # the epochs after the first (CUDA start, cuDNN's search)
        per_trial.append(
            {
                "trial_id": row["trial_id"],
                "status": row["status"],
                "data_fraction": row.get("params_data_fraction"),
                "avg_img_per_s": row["train_img_per_s"],
                "epoch_img_per_s": rates,
                "steady_img_per_s": steady,
                "avg_vs_steady": row["train_img_per_s"] / steady if steady else None,
                "peak_private_mb": row.get("peak_private_mb"),
                "started_at": row["started_at"],
                "ended_at": row["ended_at"],
            }
        )
    ratios = [r for t in per_trial if (r := t["avg_vs_steady"]) is not None and math.isfinite(r)]
    busy_share, busy_samples = busy.share(min(starts), max(ends)) if starts and ends else (None, 0)
    aggregate = images / span if span else None
    out.update(
        trials_completed=int((trials["status"] == "completed").sum()),
        devices=sorted(set(trials["device"].dropna())),
        most_at_once=_most_at_once(trials),
        trials_span_s=span,  # the first trial's start to the last one's end
        gpu_busy_share=busy_share,  # over that span
        gpu_busy_samples=busy_samples,
        gpu_memory_used_mib_max=max((u for _, _, u in busy.samples if u is not None), default=None),
        aggregate_train_img_per_s=aggregate,  # every trial's training images over the span (validation, test and start-up inside it)
        aggregate_vs_one=aggregate / out["one_steady_img_per_s"] if aggregate and out.get("one_steady_img_per_s") else None,
        trial_avg_vs_steady=statistics.median(ratios) if ratios else None,
        trial_host_uss_mb=max(memory.trials.values()) if memory.trials else None,  # the highest trial worker's private memory (USS)
        trial_host_anon_mb=max(memory.trials_anon.values()) if memory.trials_anon else None,
        trial_workers_seen=len(memory.trials),  # worker processes that ran a trial: fewer than trials when Tune reused them
        driver_uss_mb=memory.driver_uss,
        best_val_accuracy=float(trials["val_accuracy"].max()),
        trials=per_trial,
    )
    return out


def _most_at_once(trials) -> int | None:
    """The most trials whose [started_at, ended_at] spans overlap, when the rows record them (an end before a start at the same instant)."""
    if not {"started_at", "ended_at"} <= set(trials.columns):
        return None
    events = sorted([(t, 1) for t in _stamps(trials["started_at"])] + [(t, -1) for t in _stamps(trials["ended_at"])])
    running = most = 0
    for _, step in events:
        running += step
        most = max(most, running)
    return most


# ------------------------------------------------------------------ putting it together


def _summary(figures: dict, sizes: Sizes) -> dict:
    """The headline keys: one value each, from the sections' figures (None where a section was skipped or failed)."""
    trainer, seed, compute = figures.get("trainer", {}), figures.get("seed", {}), figures.get("compute", {})
    modes = trainer.get("modes", {})

    def per_mode(key: str, batch: int) -> dict:
        return {m: modes.get(f"{m}@{batch}", {}).get(key) for m in MODES}

    batch = sizes.batches[0]
    train = per_mode("train_img_per_s", batch)
    seed_speed = seed.get("workers_0")
    every = [v.get("train_img_per_s") for v in modes.values() if isinstance(v, dict)]
    best_mode = max((v for v in every if isinstance(v, float)), default=None)
    tflops = compute.get("matmul_bf16_tflops")
    mfu = best_mode * compute["flops_per_train_image"] / (tflops * 1e12) if isinstance(tflops, float) and best_mode else None
    packing = figures.get("packing", {})
    packed = {k: v["aggregate_img_per_s"] for k, v in packing.items() if isinstance(v, dict) and "aggregate_img_per_s" in v}
    fullsize = figures.get(FULLSIZE_SECTION, {})
    ours = trainer.get("trainer_train_img_per_s")
    infer = trainer.get("trainer_infer_img_per_s")
    return {
        "train_img_per_s": train,
        "infer_img_per_s": per_mode("infer_img_per_s", batch),
        **{f"train_img_per_s_at_{b}": per_mode("train_img_per_s", b) for b in sizes.batches[1:]},
        "best_train_img_per_s": best_mode,
        "seed_pipeline_img_per_s": seed_speed,
        "trainer_vs_seed": ours / seed_speed if seed_speed and ours else None,
        "trainer_vs_seed_gpu_figure": [ours / s for s in SEED_GPU_TRAIN_IMG_PER_S] if ours else None,
        "trainer_infer_vs_seed_gpu_figure": infer / SEED_GPU_INFER_IMG_PER_S if infer else None,
        "mfu": mfu,
        "packed_aggregate_img_per_s": packed or None,
        "packed_4_vs_1": packed["4"] / packed["1"] if {"1", "4"} <= set(packed) else None,
        "sweep_trials_completed": fullsize.get("trials_completed"),
    }


def measure(args: argparse.Namespace, out: Path | None = None) -> dict:
    import tempfile

    import torch

    from asl_tune.data import load_dataset

    sizes = SMOKE if args.smoke else REAL
    chosen = {
        "fullsize_trials": args.fullsize_trials,
        "fullsize_epochs": args.fullsize_epochs,
        "fullsize_per_class": args.fullsize_per_class,
        "fullsize_timeout_s": args.fullsize_timeout,
    }
    sizes = dataclasses.replace(sizes, **{k: v for k, v in chosen.items() if v is not None})
    device = _device()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed-size inputs: let cuDNN pick its fastest kernels once
    figures: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "smoke": args.smoke,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "python": platform.python_version(),
        "image_size": sizes.image_size,
        "head_width": sizes.head_width,
        **machine(),
    }
    sections = args.sections.split(",")
    data = synthetic_dataset(sizes.per_class)
    ds = load_dataset(data, sizes.image_size, progress=False)
    with tempfile.TemporaryDirectory(prefix="asl-tune-gpu-bench-") as work:
        runs = {
            "trainer": lambda: trainer_section(ds, sizes, device, args.smoke),
            "seed": lambda: seed_section(data, ds, sizes, device),
            "compute": lambda: compute_section(ds, sizes, device),
            "profile": lambda: profile_section(ds, sizes, device),
            "packing": lambda: packing_section(sizes, device),
            FULLSIZE_SECTION: lambda: fullsize_sweep_section(sizes, device, Path(work)),
        }
        for name in sections:
            figures[name] = _timed(name, runs[name])
            # A run cut short still leaves every finished section's figures, and the headline keys.
            save({**figures, **_summary(figures, sizes)}, out)
    figures.update(_summary(figures, sizes))
    return figures


def save(figures: dict, out: Path | None) -> None:
    """Write the figures so far to out, whole (written aside, then renamed)."""
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    part.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    part.replace(out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.pack_worker:
        return pack_worker(args)
    figures = measure(args, args.out)
    save(figures, args.out)
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
