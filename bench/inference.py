"""How fast a DexNet classifies: batch-64 throughput and batch-1 latency, as every trial reports them.

The figures come from asl_tune.evaluate.measure_speed, the function the trainer calls for each trial's
infer_img_per_s, latency_ms_p50, latency_ms_p95 and keeps_up_30fps, on the same input path: real
images decoded into the uint8 cache (the validation split of the default synthetic dataset unless
--data is given), normalised on the fly by the trainer's Batcher, uint8 in, logits out, eval mode.
The weights are a fresh DexNet's: speed depends on the architecture, not on what it has learned.

  infer_img_per_s   images per second through batches of 64
  latency_ms_p50    one image at a time, median milliseconds
  latency_ms_p95    one image at a time, 95th percentile
  keeps_up_30fps    latency_ms_p95 <= 33.3 ms (one frame of 30 fps video)

Each figure is the median over --repeats rounds of measure_speed (each round times about --budget-s
seconds of batches, then as long again of single images).

    python bench/inference.py --head-width 256 --image-size 64 --threads 2 --json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say  # noqa: E402

DEVICES = ("auto", "cpu", "cuda")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--data",
        type=Path,
        help="a folder-per-class dataset (default: the embedded synthetic dataset `asl-tune train` and `sweep` use, rendered on first use)",
    )
    p.add_argument("--image-size", type=int, default=64, help="input side in px (default 64; the seed used 200)")
    p.add_argument("--head-width", type=int, default=256, help="DexNet head width (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    p.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="auto (the first GPU, else the CPU, as the trainer picks), cpu or cuda (default auto)",
    )
    p.add_argument(
        "--budget-s",
        dest="budget_s",
        type=float,
        default=2.0,
        help="seconds of batches, then of single images, per round (default 2; a trial uses 1)",
    )
    p.add_argument("--repeats", type=int, default=5, help="rounds; each figure is their median (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seeds the weights and the split whose validation images are fed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


def pick(device: str):
    """The torch device asked for; auto picks as the trainer does."""
    import torch

    from asl_tune.errors import AslTuneError
    from asl_tune.train import pick_device

    if device == "auto":
        return pick_device()
    if device == "cuda" and not torch.cuda.is_available():
        raise AslTuneError("--device: cuda asked for, but torch sees no GPU")
    return torch.device(device)


def measure(args: argparse.Namespace) -> dict:
    """Load the images, build the network as the trainer does, and time it --repeats times."""
    import torch

    from asl_tune.data import Batcher, load_dataset, make_splits
    from asl_tune.evaluate import measure_speed
    from asl_tune.model import DexNet
    from asl_tune.results import FRAME_BUDGET_MS
    from asl_tune.synth import ensure_default_dataset
    from asl_tune.train import AUTOCAST, device_name, keeps_on_device, pick_precision

    figures: dict = {**machine()}
    torch.set_num_threads(args.threads)
    device = pick(args.device)
    on_gpu = device.type == "cuda"
    data = args.data or ensure_default_dataset(progress=False)
    ds = load_dataset(data, args.image_size, progress=False)
    rows = make_splits(ds.labels, ds.frames, "blocked", args.seed).val

    # The trainer's set-up (asl_tune.train.set_up): channels-last and bf16 autocast on a GPU,
    # the uint8 array kept on the GPU when it fits.
    torch.manual_seed(args.seed)
    model = DexNet(args.head_width, args.image_size, len(ds.classes)).to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    batcher = Batcher(ds.images, device, channels_last=on_gpu)
    if on_gpu and keeps_on_device(ds.images.nbytes, torch.cuda.get_device_properties(device).total_memory, 1.0):
        batcher.to_device()
    say(
        f"DexNet head {args.head_width} at {args.image_size} px on {device_name(device)}, {args.threads} threads; "
        f"{len(rows)} validation images of {data}; {args.repeats} rounds of ~{2 * args.budget_s:g} s"
    )

    started = time.perf_counter()
    rounds = []
    for r in range(args.repeats):
        speed = measure_speed(model, batcher, rows, autocast=AUTOCAST[pick_precision(device)], budget_s=args.budget_s)
        rounds.append(speed)
        say(
            f"round {r + 1}: {speed['infer_img_per_s']:.1f} img/s at batch 64; batch 1 p50 {speed['latency_ms_p50']:.2f} ms, p95 {speed['latency_ms_p95']:.2f} ms"
        )
    wall_s = time.perf_counter() - started

    def median(key: str) -> float:
        return statistics.median(s[key] for s in rounds)

    p95 = median("latency_ms_p95")
    figures.update(
        infer_img_per_s=median("infer_img_per_s"),
        latency_ms_p50=median("latency_ms_p50"),
        latency_ms_p95=p95,
        keeps_up_30fps=bool(p95 <= FRAME_BUDGET_MS),
        frame_budget_ms=FRAME_BUDGET_MS,
        infer_img_per_s_rounds=[s["infer_img_per_s"] for s in rounds],
        latency_ms_p95_rounds=[s["latency_ms_p95"] for s in rounds],
        image_size=args.image_size,
        head_width=args.head_width,
        batch_size=64,
        n_parameters=sum(p.numel() for p in model.parameters()),
        device=device_name(device),
        threads=args.threads,
        torch_version=torch.__version__,
        dataset=Path(data).name,
        images=len(rows),
        repeats=args.repeats,
        budget_s=args.budget_s,
        wall_s=wall_s,
        # With the start's load_avg_1min: a figure taken while something else ran shows it.
        load_avg_1min_end=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    )
    return figures


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if args.repeats < 1 or args.threads < 1 or not args.budget_s > 0:
        print("inference.py: --repeats and --threads must be >= 1 and --budget-s > 0", file=sys.stderr)
        return 2
    from asl_tune.config import check_value
    from asl_tune.errors import AslTuneError

    for key in ("image_size", "head_width"):  # the trainer's own rules for these settings
        if (why := check_value(key, getattr(args, key))) is not None:
            print(f"inference.py: --{key.replace('_', '-')}: {why}, got {getattr(args, key)}", file=sys.stderr)
            return 2
    try:
        figures = measure(args)
    except AslTuneError as e:  # a bad --data, an --image-size DexNet cannot take, ...
        print(f"inference.py: {e}", file=sys.stderr)
        return 2
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
