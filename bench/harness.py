"""What every bench script shares: its synthetic dataset, progress lines on stderr, and the JSON last line.

The scripts in bench/ import this module as a sibling (`python bench/<script>.py` puts bench/ on the path).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

BENCH_DATA = "bench-data"  # sub-folder of the asl-tune cache holding the bench's rendered datasets


def say(message: str) -> None:
    """One progress line on stderr, stamped with the seconds since the script started."""
    print(f"[{time.perf_counter() - _STARTED:7.1f} s] {message}", file=sys.stderr, flush=True)


_STARTED = time.perf_counter()


def synthetic_dataset(per_class: int, seed: int = 0) -> Path:
    """A rendered synthetic dataset (Kaggle layout, 200 px JPEGs) with per_class frames per class, made once and reused."""
    from asl_tune.data import cache_root
    from asl_tune.synth import SYNTH_VERSION, render_dataset

    # The renderer's version is in the name, so a renderer change never reuses stale images.
    folder = cache_root() / BENCH_DATA / f"synth-{SYNTH_VERSION}-pc{per_class}-s{seed}"
    if not folder.is_dir():
        say(f"rendering a synthetic dataset with {per_class} images per class into {folder}")
        folder.parent.mkdir(parents=True, exist_ok=True)
        render_dataset(folder, per_class=per_class, seed=seed, image_px=200, progress=False)
    return folder


def machine() -> dict:
    """Where the figures were taken: host, CPU count, load average at the start (a busy machine skews them)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"hostname": platform.node(), "cpu_count": os.cpu_count(), "load_avg_1min": round(load, 2)}


def _clean(value):
    """Plain JSON values: numpy scalars as Python ones; NaN and infinity (JSON has none) as null."""
    if hasattr(value, "item") and not isinstance(value, (list, tuple, dict)):  # numpy bool_, int64, float64
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def emit(figures: dict, as_json: bool) -> None:
    """Print the figures: one JSON object on the last stdout line with --json, else one `key: value` per line."""
    figures = _clean(figures)
    sys.stdout.flush()
    if as_json:
        print(json.dumps(figures, sort_keys=False), flush=True)
        return
    for key, value in figures.items():
        shown = f"{value:.4g}" if isinstance(value, float) else value
        print(f"{key}: {shown}")
