"""Is `asl-tune analyze --speed-on cpu|cuda`'s figure the model's own speed? It is checked against bench/inference.py.

analyze times each architecture once, alone (asl_tune.analysis.speed.measure_alone: a fresh DexNet on
random uint8 images, 3 warm-up runs, then 20 batches of 64 timed in 5 groups whose median rate it keeps, and 100
single images). bench/inference.py
times the same architecture on real images of the default synthetic dataset, rounds of about --budget-s
seconds each, and keeps the median. This script runs both on this machine, --repeats times in turn (a
bench round, then one of analyze's measurements, a fresh call as each analyze on a new sweep makes),
so a change in what else the machine runs touches both alike, and reports how far each of analyze's
figures is from the median of the bench's rounds:

  deviation_infer_img_per_s   |median of analyze's / median of the bench's - 1|, batch-64 throughput
  deviation_latency_ms_p50    the same for the batch-1 median latency
  deviation_latency_ms_p95    the same for the 95th percentile (reported, not judged: a tail of 100 samples)
  within_10pct                both judged deviations <= 0.10
  largest_deviation_*         the largest |one analyze figure / the bench's median - 1| (reported, not judged)
  bench_spread_*              the largest |one bench round / the bench's median - 1|: how far the machine
                              moves the bench itself from one round to the next, the floor for the line above

The medians are judged because a single figure cannot be held closer to another method than the machine
holds the bench to itself: on a 2-core box with nothing else running, the bench's own rounds spread by
up to 20% (bench/RESULTS.md section 7).

    python bench/speed_alone.py --head-width 256 --image-size 64 --threads 2 --json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say  # noqa: E402

TOLERANCE = 0.10
JUDGED = ("infer_img_per_s", "latency_ms_p50")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the bench's images, a folder-per-class dataset (default: the embedded synthetic dataset)")
    p.add_argument("--image-size", type=int, default=64, help="input side in px (default 64)")
    p.add_argument("--head-width", type=int, default=256, help="DexNet head width (default 256)")
    p.add_argument("--threads", type=int, default=2, help="torch threads, for both (default 2)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cpu or cuda, for both (default cpu)")
    p.add_argument("--repeats", type=int, default=5, help="the bench's rounds, and analyze's measurements (default 5)")
    p.add_argument("--budget-s", dest="budget_s", type=float, default=2.0, help="the bench's seconds per round and kind (default 2)")
    p.add_argument("--batches", type=int, default=None, help="analyze's timed batches of 64 (default: analyze's own, 20)")
    p.add_argument("--latencies", type=int, default=None, help="analyze's timed single images (default: analyze's own, 100)")
    p.add_argument("--json", action="store_true", help="print one JSON object on the last stdout line")
    return p.parse_args(argv)


def measure(args: argparse.Namespace) -> dict:
    """The bench's rounds and analyze's measurements in turn, and how far each of analyze's is from the bench's median."""
    import dataclasses
    import statistics

    import inference

    from asl_tune.analysis.speed import classes_from_parameters, measure_alone, speed_on
    from asl_tune.evaluate import Timed

    bench_args = [
        f"--image-size={args.image_size}",
        f"--head-width={args.head_width}",
        f"--threads={args.threads}",
        f"--device={args.device}",
        "--repeats=1",
        f"--budget-s={args.budget_s}",
    ] + ([f"--data={args.data}"] if args.data else [])
    counts = {k: v for k, v in (("batches", args.batches), ("latencies", args.latencies)) if v is not None}
    on = speed_on(args.device, args.threads, dataclasses.replace(Timed(), **counts))
    figures = machine()
    rounds, alone = [], []
    for r in range(args.repeats):
        rounds.append(inference.measure(inference.parse_args(bench_args)))
        classes = classes_from_parameters(args.head_width, args.image_size, rounds[-1]["n_parameters"])  # the bench's dataset decides it
        alone.append(measure_alone(args.head_width, args.image_size, classes, on))
        say(
            f"analyze's measurement {r + 1}: {alone[-1]['infer_img_per_s']:.1f} img/s, p50 {alone[-1]['latency_ms_p50']:.2f} ms, p95 {alone[-1]['latency_ms_p95']:.2f} ms"
        )
    figures.update(
        device=rounds[0]["device"], threads=args.threads, image_size=args.image_size, head_width=args.head_width, classes=classes
    )
    for key in (*JUDGED, "latency_ms_p95"):
        bench = statistics.median(b[key] for b in rounds)
        figures[f"bench_{key}"] = bench
        figures[f"bench_{key}_rounds"] = [b[key] for b in rounds]
        figures[f"analyze_{key}"] = [a[key] for a in alone]
        figures[f"deviation_{key}"] = abs(statistics.median(a[key] for a in alone) / bench - 1)
        figures[f"largest_deviation_{key}"] = max(abs(a[key] / bench - 1) for a in alone)
        figures[f"bench_spread_{key}"] = max(abs(b[key] / bench - 1) for b in rounds)
    figures.update(timed=dataclasses.asdict(on.timed), bench_repeats=args.repeats, bench_budget_s=args.budget_s)
    figures["within_10pct"] = all(figures[f"deviation_{key}"] <= TOLERANCE for key in JUDGED)
    figures["load_avg_1min_end"] = machine()["load_avg_1min"]
    return figures


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    args = parse_args(argv)
    if (
        args.repeats < 1
        or args.threads < 1
        or not args.budget_s > 0
        or any(v is not None and v < 1 for v in (args.batches, args.latencies))
    ):
        print("speed_alone.py: --repeats, --threads, --batches and --latencies must be >= 1 and --budget-s > 0", file=sys.stderr)
        return 2
    from asl_tune.errors import AslTuneError

    try:
        figures = measure(args)
    except AslTuneError as e:
        print(f"speed_alone.py: {e}", file=sys.stderr)
        return 2
    emit(figures, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
