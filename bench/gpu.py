"""Everything GPU-related in one short run: the trainer's speed in each precision mode, the seed's input
pipeline on the same GPU, the compute bound (FLOPs, a bf16 matmul, MFU), several trainers packed on one
GPU, and a real `asl-tune sweep` with --gpus-per-trial 0.25. One JSON object at the end.

    python bench/gpu.py --json --out gpu.json        # on a machine with one GPU: about 6-8 minutes on an H100
    python bench/gpu.py --smoke --json               # every section at tiny sizes on the CPU (tests run this)

Sections that need CUDA say so ({"skipped": "..."}) when there is none; a section that fails records
its error and the others still run, so one bad section never costs the whole (rare) GPU session.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

from harness import emit, machine, say, synthetic_dataset

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
    sweep_trials: int
    sweep_epochs: int  # long enough that four trials' spans overlap (3 epochs of 2,320 images took ~6 s on an H100)
    sweep_image_size: int
    trainer_epochs: int
    matmul: int  # side of the square bf16 matmul


REAL = Sizes(image_size=200, head_width=512, per_class=100, batches=(64, 256), steps=120, warmup=5, seed_workers=(0, 8), pack_seconds=20.0, packs=(1, 2, 4), sweep_trials=8, sweep_epochs=30, sweep_image_size=200, trainer_epochs=5, matmul=8192)
# The smoke run goes through every section's code on the CPU, packing and the sweep included (without GPUs).
SMOKE = Sizes(image_size=32, head_width=16, per_class=6, batches=(8,), steps=2, warmup=1, seed_workers=(0,), pack_seconds=1.0, packs=(1, 2), sweep_trials=2, sweep_epochs=1, sweep_image_size=32, trainer_epochs=1, matmul=256)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="gpu.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes on whatever device there is; CUDA-only sections report themselves skipped")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    p.add_argument("--out", type=Path, help="also write the JSON object to this file")
    p.add_argument("--sections", default="trainer,seed,compute,profile,packing,sweep", help="comma-separated sections to run (default all)")
    p.add_argument("--pack-worker", action="store_true", help=argparse.SUPPRESS)  # one packed trainer (run by the packing section)
    p.add_argument("--share", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("--seconds", type=float, default=10.0, help=argparse.SUPPRESS)
    p.add_argument("--image-size", type=int, default=REAL.image_size, help=argparse.SUPPRESS)
    p.add_argument("--head-width", type=int, default=REAL.head_width, help=argparse.SUPPRESS)
    return p.parse_args(argv)


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
    if bf16 and device.type != "cuda" and sizes is SMOKE:
        # A CPU without bf16 units runs autocast at a few img/s: the smoke run checks the steps, not these speeds.
        figures["infer_img_per_s"] = None
        return figures
    figures.update({k: v for k, v in measure_speed(model, batcher, rows.numpy(), autocast=torch.bfloat16 if bf16 else None).items() if k != "keeps_up_30fps"})
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
                out["modes"][f"{mode}@{batch}"] = {"skipped": "torch.compile is measured on CUDA only (minutes of C++ compilation on a CPU)"}
                continue
            say(f"trainer: {mode} at batch {batch}")
            out["modes"][f"{mode}@{batch}"] = _timed(f"{mode}@{batch}", lambda: _one_mode(mode, batch, ds, sizes, device))
    for batch in sizes.batches:
        say(f"trainer: asl_tune.train.train_trial at batch {batch}")
        config = TrialConfig(head_width=sizes.head_width, image_size=sizes.image_size, epochs=sizes.trainer_epochs, batch_size=batch, dropout=0.5, lr=0.008)
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
    return {"batch": batch, "measure": attr, "total_ms": total / 1000,
            "top": [{"name": k[:140], "ms": t / 1000, "share": t / total, "calls": c} for k, t, c in top]}


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
        command = [sys.executable, __file__, "--pack-worker", "--share", str(1 / k), "--seconds", str(sizes.pack_seconds), "--image-size", str(sizes.image_size), "--head-width", str(sizes.head_width)]
        procs = [subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // k))}) for _ in range(k)]
        each = [json.loads(p.communicate(timeout=sizes.pack_seconds * 10 + 120)[0].strip().splitlines()[-1]) for p in procs]
        out[str(k)] = {"aggregate_img_per_s": sum(e["img_per_s"] for e in each), "per_trial_img_per_s": [e["img_per_s"] for e in each], "peak_memory_mb": [e["peak_memory_mb"] for e in each]}
    return out


# ------------------------------------------------------------------ a real sweep


def sweep_section(data: Path, sizes: Sizes, device, work: Path) -> dict:
    """`asl-tune sweep` with Ray and Optuna, --gpus-per-trial 0.25: every trial completes, on the GPU, 4 at once."""
    import pandas as pd
    import yaml

    space = work / "gpu-sweep.yaml"
    space.write_text(yaml.safe_dump({
        "name": "gpu-sweep", "metric": "val_accuracy", "mode": "max", "num_samples": sizes.sweep_trials, "early_stopping": False,
        "fixed": {"image_size": sizes.sweep_image_size, "batch_size": 64, "epochs": sizes.sweep_epochs, "momentum": 0.9, "dropout": 0.0},
        "params": {"head_width": {"type": "categorical", "choices": [128, 256, 512] if device.type == "cuda" else [8, 16]}, "lr": {"type": "float", "low": 0.003, "high": 0.03, "log": True}},
    }))
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "asl_tune", "sweep", "--space", str(space), "--data", str(data), "--results", str(work / "results"),
                           "--gpus-per-trial", "0.25" if device.type == "cuda" else "0", "--cpus-per-trial", "2" if device.type == "cuda" else "1"],
                          capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - start
    trials = pd.read_parquet(work / "results" / "gpu-sweep" / "trials.parquet") if (work / "results" / "gpu-sweep" / "trials.parquet").exists() else pd.DataFrame()
    out = {"exit_status": done.returncode, "wall_s": wall, "log_tail": (done.stdout + done.stderr)[-3000:]}
    if len(trials):
        out.update(trials_completed=int((trials["status"] == "completed").sum()), devices=sorted(set(trials["device"].dropna())),
                   most_at_once=_most_at_once(trials), best_val_accuracy=float(trials["val_accuracy"].max()),
                   spans=[[str(a), str(b)] for a, b in zip(trials.get("started_at", []), trials.get("ended_at", []))])
    return out


def _most_at_once(trials) -> int | None:
    """The most trials whose [started_at, ended_at] spans overlap, when the rows record them."""
    if not {"started_at", "ended_at"} <= set(trials.columns):
        return None
    events = sorted([(t, 1) for t in trials["started_at"].dropna()] + [(t, -1) for t in trials["ended_at"].dropna()])
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
    sweep = figures.get("sweep", {})
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
        "sweep_trials_completed": sweep.get("trials_completed"),
    }


def measure(args: argparse.Namespace, out: Path | None = None) -> dict:
    import tempfile

    import torch

    from asl_tune.data import load_dataset

    sizes = SMOKE if args.smoke else REAL
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
    sections = set(args.sections.split(","))
    data = synthetic_dataset(sizes.per_class)
    ds = load_dataset(data, sizes.image_size, progress=False)
    with tempfile.TemporaryDirectory(prefix="asl-tune-gpu-bench-") as work:
        runs = {
            "trainer": lambda: trainer_section(ds, sizes, device, args.smoke),
            "seed": lambda: seed_section(data, ds, sizes, device),
            "compute": lambda: compute_section(ds, sizes, device),
            "profile": lambda: profile_section(ds, sizes, device),
            "packing": lambda: packing_section(sizes, device),
            "sweep": lambda: sweep_section(data, sizes, device, Path(work)),
        }
        for name, run in runs.items():
            if name in sections:
                figures[name] = _timed(name, run)
                save(figures, out)  # a run cut short still leaves every finished section's figures
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
