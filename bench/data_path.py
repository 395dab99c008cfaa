"""How much the data path costs: the trainer's whole epochs against a bare step and the seed's pipeline.

On one synthetic dataset, with the same model (DexNet), batch size, optimiser, threads and number of
training images, measure training throughput three ways:

  trainer_img_per_s        asl_tune.train.train_trial: whole training epochs, batches cut from the
                           decoded uint8 cache and normalised on the fly (validation is not counted:
                           the trainer's own train_img_per_s leaves it out)
  bare_img_per_s           the same steps on float batches already normalised in memory: the ceiling
  seed_pipeline_img_per_s  the seed notebook's path: torchvision ImageFolder, PIL decode, Resize,
                           ToTensor and Normalize of every image every epoch, DataLoader(batch 64)

and the decoded cache itself: a cold build (every JPEG decoded once) and a warm load (memory map).
Targets (CPU, 64 px): trainer >= 0.90 x bare and >= 1.3 x the seed's pipeline.

    python bench/data_path.py --json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say, synthetic_dataset  # noqa: E402

TARGET_VS_BARE = 0.90
TARGET_VS_SEED = 1.3


@dataclass(frozen=True)
class Setup:
    """What every pipeline shares, so only the data path differs."""

    image_size: int  # square input side, px
    head_width: int  # DexNet head width
    batch_size: int  # training batch, images
    lr: float  # SGD learning rate (no momentum, as the seed)
    epochs: int  # timed passes over the training rows
    threads: int  # torch intra-op threads
    seed: int  # seeds the split, the weights and the batch order


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data", type=Path, help="a folder-per-class dataset (default: a synthetic one rendered at 200 px, --per-class frames per class)"
    )
    p.add_argument(
        "--per-class",
        type=int,
        default=40,
        help="synthetic images per class when --data is not given (default 40: 1,160 images, 812 for training)",
    )
    p.add_argument("--image-size", type=int, default=64, help="input side in px for all three pipelines (default 64; the seed used 200)")
    p.add_argument("--head-width", type=int, default=512, help="DexNet head width (default 512, the seed's model 1)")
    p.add_argument("--batch-size", type=int, default=64, help="training batch size (default 64, the seed's)")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per pipeline (default 2)")
    p.add_argument(
        "--repeats", type=int, default=1, help="measure each pipeline this many times, interleaved, and report the median (default 1)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch threads for every pipeline (default 2)")
    p.add_argument(
        "--loader-workers",
        type=int,
        nargs="*",
        default=[0],
        help="DataLoader num_workers for the seed's pipeline; the first is the headline figure (default 0, the seed's; e.g. 0 2)",
    )
    p.add_argument(
        "--cache-workers", type=int, default=None, help="decode processes for the cold cache build (default: the library's, min(CPUs, 8))"
    )
    p.add_argument("--skip-cache", action="store_true", help="do not time a cold cache build (use the normal cache)")
    p.add_argument("--seed", type=int, default=0, help="seeds the split, the weights and the batch order (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


# ------------------------------------------------------------------ the cache


def time_cache(data: Path, image_size: int, workers: int | None) -> dict:
    """Build the decoded cache from nothing in a scratch cache folder, then load it again warm; return the timings."""
    from asl_tune.data import load_dataset

    with tempfile.TemporaryDirectory(prefix="asl-bench-cache-") as scratch:
        old = os.environ.get("ASL_TUNE_CACHE")
        os.environ["ASL_TUNE_CACHE"] = scratch  # cache_root() reads it at call time
        try:
            t0 = time.perf_counter()
            ds = load_dataset(data, image_size, progress=False, workers=workers)
            build_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            ds = load_dataset(data, image_size, progress=False, workers=workers)
            warm_s = time.perf_counter() - t0
        finally:
            if old is None:
                os.environ.pop("ASL_TUNE_CACHE", None)
            else:
                os.environ["ASL_TUNE_CACHE"] = old
        n = len(ds.labels)
        figures = {
            "n_images": n,
            "cache_build_s": build_s,
            "cache_build_img_per_s": n / build_s,
            "cache_load_s": warm_s,
            "cache_workers": workers or min(os.cpu_count() or 1, 8),
        }
    return figures


# ------------------------------------------------------------------ the three pipelines


def new_model(setup: Setup, num_classes: int, device):
    """A fresh DexNet and its SGD optimiser, seeded as the trainer seeds them."""
    import torch

    from asl_tune.model import DexNet

    torch.manual_seed(setup.seed)
    model = DexNet(setup.head_width, setup.image_size, num_classes).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=setup.lr)


def train_step(model, optimizer, x, y) -> tuple[float, int]:
    """One SGD step with the trainer's arithmetic and bookkeeping; returns (loss, correct) so the work is the same."""
    import torch

    on_gpu = x.device.type == "cuda"
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=on_gpu):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return float(loss.detach()), int((logits.argmax(1) == y).sum())


def warm_up(setup: Setup, num_classes: int, device) -> None:
    """A few throwaway steps, so whichever pipeline runs first does not pay for the library's first-call set-up."""
    import torch

    model, opt = new_model(setup, num_classes, device)
    x = torch.randn(setup.batch_size, 3, setup.image_size, setup.image_size, device=device)
    y = torch.randint(0, num_classes, (setup.batch_size,), device=device)
    for _ in range(3):
        train_step(model, opt, x, y)


def trainer_throughput(setup: Setup, ds, device) -> tuple[float, int]:
    """(img/s over whole training epochs, training images per epoch) from the trainer itself."""
    from asl_tune.config import TrialConfig
    from asl_tune.train import train_trial

    config = TrialConfig(
        head_width=setup.head_width,
        lr=setup.lr,
        epochs=setup.epochs,
        batch_size=setup.batch_size,
        image_size=setup.image_size,
        seed=setup.seed,
    )
    result = train_trial(config, ds, threads=setup.threads, device=device)
    return float(result.final["train_img_per_s"]), int(result.final["images_seen"]) // setup.epochs


def train_rows(ds, seed: int):
    """The rows the trainer trains on (its training split), so every pipeline sees as many images."""
    from asl_tune.data import make_splits

    return make_splits(ds.labels, ds.frames, "blocked", seed).train


def bare_throughput(setup: Setup, ds, rows, device) -> float:
    """img/s of training steps on batches already normalised and in memory: no data path at all."""
    import torch

    from asl_tune.data import Batcher

    batcher = Batcher(ds.images, device, channels_last=device.type == "cuda")
    rows_t = torch.from_numpy(rows)
    labels = torch.from_numpy(ds.labels).to(device)
    batches = [
        (batcher.batch(rows_t[s : s + setup.batch_size]), labels[rows_t[s : s + setup.batch_size].to(device)])
        for s in range(0, len(rows_t), setup.batch_size)
    ]
    model, opt = new_model(setup, len(ds.classes), device)
    model.train()
    seen, start = 0, time.perf_counter()
    for epoch in range(setup.epochs):
        gen = torch.Generator().manual_seed(setup.seed * 100_003 + epoch)
        for i in torch.randperm(len(batches), generator=gen).tolist():
            x, y = batches[i]
            train_step(model, opt, x, y)
            seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def seed_loader(data: Path, image_size: int, n_images: int, batch_size: int, workers: int, seed: int):
    """The seed notebook's input path: ImageFolder + Resize/ToTensor/Normalize, a shuffled DataLoader over n_images images."""
    import torch
    from torchvision import datasets, transforms

    from asl_tune.data import MEAN, STD, find_class_root

    tf = transforms.Compose([transforms.Resize(image_size), transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    folder = datasets.ImageFolder(str(find_class_root(data)), transform=tf)
    # As many images as the trainer's training split; which ones does not change the cost (all are 200 px JPEGs).
    pick = torch.randperm(len(folder), generator=torch.Generator().manual_seed(seed))[:n_images].tolist()
    subset = torch.utils.data.Subset(folder, pick)
    return torch.utils.data.DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def seed_pipeline_throughput(setup: Setup, data: Path, n_images: int, num_classes: int, workers: int, device) -> float:
    """img/s of the seed's pipeline: every image read, decoded and transformed with PIL each epoch, then the step."""
    import torch

    loader = seed_loader(data, setup.image_size, n_images, setup.batch_size, workers, setup.seed)
    model, opt = new_model(setup, num_classes, device)
    model.train()
    seen, start = 0, time.perf_counter()
    for _ in range(setup.epochs):
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            train_step(model, opt, x, y)
            seen += len(y)
    _sync(device)
    return seen / (time.perf_counter() - start)


def seed_decode_throughput(data: Path, image_size: int, n_images: int, batch_size: int, seed: int) -> float:
    """img/s of the seed's input path alone (no training), in one process: what decoding every epoch costs."""
    loader = seed_loader(data, image_size, n_images, batch_size, 0, seed)
    seen, start = 0, time.perf_counter()
    for x, _ in loader:
        seen += len(x)
    return seen / (time.perf_counter() - start)


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ------------------------------------------------------------------ putting it together


def measure(args: argparse.Namespace) -> dict:
    """Run every measurement and return the figures."""
    import torch

    from asl_tune.data import load_dataset
    from asl_tune.train import device_name, pick_device

    figures: dict = {**machine()}
    data = args.data or synthetic_dataset(args.per_class, args.seed)
    if not args.skip_cache:
        say(f"timing a cold cache build of {data} at {args.image_size} px")
        cache = time_cache(data, args.image_size, args.cache_workers)
        figures.update(cache)
    ds = load_dataset(data, args.image_size, progress=True)
    torch.set_num_threads(args.threads)
    device = pick_device()
    setup = Setup(args.image_size, args.head_width, args.batch_size, 0.008, args.epochs, args.threads, args.seed)
    rows = train_rows(ds, args.seed)
    n_train = len(rows)
    say(
        f"{n_train} training images, {args.epochs} epochs, batch {args.batch_size}, head {args.head_width}, {args.threads} threads on {device_name(device)}"
    )
    warm_up(setup, len(ds.classes), device)

    runs: dict[str, list[float]] = {"bare": [], "trainer": []}
    runs.update({f"seed_w{w}": [] for w in args.loader_workers})
    for rep in range(args.repeats):
        runs["bare"].append(bare_throughput(setup, ds, rows, device))
        say(f"bare step: {runs['bare'][-1]:.1f} img/s")
        ips, per_epoch = trainer_throughput(setup, ds, device)
        assert per_epoch == n_train, "the trainer trained on a different number of images"
        runs["trainer"].append(ips)
        say(f"trainer: {ips:.1f} img/s")
        for w in args.loader_workers:
            runs[f"seed_w{w}"].append(seed_pipeline_throughput(setup, data, n_train, len(ds.classes), w, device))
            say(f"seed pipeline, {w} loader workers: {runs[f'seed_w{w}'][-1]:.1f} img/s")
    med = {k: statistics.median(v) for k, v in runs.items()}
    headline_seed = med[f"seed_w{args.loader_workers[0]}"]
    figures.update(
        trainer_img_per_s=med["trainer"],
        bare_img_per_s=med["bare"],
        seed_pipeline_img_per_s=headline_seed,
        trainer_vs_bare=med["trainer"] / med["bare"],
        trainer_vs_seed=med["trainer"] / headline_seed,
        meets_target_vs_bare=med["trainer"] / med["bare"] >= TARGET_VS_BARE,
        meets_target_vs_seed=med["trainer"] / headline_seed >= TARGET_VS_SEED,
        image_size=args.image_size,
        device=device_name(device),
        threads=args.threads,
        batch_size=args.batch_size,
        head_width=args.head_width,
        train_images=n_train,
        epochs=args.epochs,
        repeats=args.repeats,
        loader_workers=args.loader_workers[0],
    )
    for w in args.loader_workers[1:]:
        figures[f"seed_pipeline_img_per_s_workers{w}"] = med[f"seed_w{w}"]
    figures["seed_decode_only_img_per_s"] = seed_decode_throughput(data, args.image_size, n_train, args.batch_size, args.seed)
    say(f"seed input path alone (decode + transforms, no training): {figures['seed_decode_only_img_per_s']:.1f} img/s")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.epochs < 1 or args.repeats < 1 or args.threads < 1 or not args.loader_workers:
        print("data_path.py: --epochs, --repeats and --threads must be >= 1 and --loader-workers non-empty", file=sys.stderr)
        return 2
    emit(measure(args), args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
