"""The real dataset's size: does a sweep of the 87,000-image ASL Alphabet shape fit, and what does it cost?

Builds a stand-in of the Kaggle set's exact shape (29 classes x 3,000 JPEGs at 200 x 200, the Kaggle
layout): the synthetic renderer's --render-per-class frames per class, each hard-linked to consecutive
names <class>1.jpg ... <class>3000.jpg, frame order kept, so the JPEGs take about 35 MB of disk. Then,
at each --sizes image size, runs a real sweep as a user would (`asl-tune sweep`, a child process):
--trials trials at once, 1 epoch, data_fraction 0.01, validation and test on their whole splits. While
it runs it samples, every half second, the driver's RSS and private memory (USS, /proc/PID/smaps_rollup)
and each trial worker's USS; afterwards it reads the bytes Ray spilled to disk (its temp folder is the
run's own) and the trials' rows.

JSON, one object per image size under "64", "200" (...): completed, trial_uss_mb (the highest trial's peak
private memory, USS, while all --trials ran at once), trial_uss_alone_mb (the same once the others had
exited: the code pages of torch and Ray it shared with them then count as its own, see Sampler), trial_anon_mb
(its anonymous memory: heap, tensors, any copy of the data), driver_uss_mb, driver_anon_mb, driver_rss_mb,
spilled_mb, decode_s (None: decoded by an earlier run into the same --work), handoff_s (decoded to Tune's
start: the memory plan and the hand-off to the trials), first_result_s (the sweep's start to its first trial
result), wall_s, trial_peak_private_mb (what the trials reported); top level n_images, date, load_avg_1min.
The decoded cache goes under the work folder (ASL_TUNE_CACHE, unless set), removed with it.

    python bench/fullsize.py --json                 # 87,000 images, 64 and 200 px (about 15 min on 2 cores)
    python bench/fullsize.py --smoke --json         # 29 x 30 images at 32 px: the suite's check
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import emit, machine, say, synthetic_dataset  # noqa: E402

KAGGLE_PER_CLASS = 3000
GB = 1e9
RESULT_LINE = re.compile(r"trial \w+ (at rung|completed|stopped|errored|diverged)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 200], help="image sizes to sweep at, px (default 64 200)")
    p.add_argument(
        "--per-class", type=int, default=KAGGLE_PER_CLASS, help="images per class in the stand-in (default 3,000: the Kaggle set's 87,000)"
    )
    p.add_argument(
        "--render-per-class",
        type=int,
        default=100,
        help="distinct rendered frames per class, hard-linked to --per-class names (default 100)",
    )
    p.add_argument("--trials", type=int, default=2, help="trials, all at once (default 2: one per core)")
    p.add_argument("--data-fraction", type=float, default=0.01, help="share of the training split each trial trains on (default 0.01)")
    p.add_argument("--work", type=Path, help="where the stand-in and the sweeps go (default: a temporary folder, removed after)")
    p.add_argument("--smoke", action="store_true", help="a tiny run for the test suite: 30 images per class from 3 rendered, at 32 px")
    p.add_argument("--json", action="store_true", help="print the figures as one JSON object on the last stdout line")
    args = p.parse_args(argv)
    if args.smoke:
        args.sizes, args.per_class, args.render_per_class = [32], 30, 3
    return args


def distinct_files(root: Path) -> int:
    """How many distinct files (inodes) the stand-in's names point at: the rendered frames, not one per name."""
    return len({p.stat().st_ino for p in root.rglob("*.jpg")})


def build_standin(out: Path, per_class: int, render_per_class: int) -> tuple[Path, int]:
    """The Kaggle layout under out/asl_alphabet_train/asl_alphabet_train/<class>/<class>N.jpg, N = 1..per_class, each a hard link
    to one of render_per_class rendered frames in order (frame k covers a run of consecutive N); returns (out, images)."""
    from asl_tune.data import _list_class_tree, find_class_root

    source = find_class_root(synthetic_dataset(render_per_class))
    classes, entries = _list_class_tree(source)
    base = out / "asl_alphabet_train" / "asl_alphabet_train"
    by_class: dict[int, list[Path]] = {}
    for path, label, _ in entries:
        by_class.setdefault(label, []).append(path)
    n = 0
    for label, name in enumerate(classes):
        frames = by_class[label]
        folder = base / name
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            target = folder / f"{name}{i + 1}.jpg"
            if not target.exists():
                os.link(frames[i * len(frames) // per_class], target)
            n += 1
    return out, n


def check_room(n_images: int, sizes: list[int], work: Path) -> None:
    """Refuse in one line, exit 2, when the decoded cache or the sweeps' memory cannot fit here."""
    from asl_tune.data import cache_root, decoded_bytes

    need = sum(decoded_bytes(n_images, s) for s in sizes)
    probe = cache_root()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if need * 1.05 > free:
        sys.exit(
            f"fullsize.py: error: the decoded cache needs {need / GB:.1f} GB in {cache_root()} and its disk has {free / GB:.1f} GB free; set ASL_TUNE_CACHE to a larger disk or use smaller --sizes"
        )
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if mem < 8 * GB and max(sizes) >= 200:
        sys.exit(f"fullsize.py: error: this machine has {mem / GB:.1f} GB of memory; the 200 px run wants at least 8 GB")
    work.mkdir(parents=True, exist_ok=True)


def _smaps_mb(pid: int, fields: tuple[str, ...]) -> float | None:
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return None
    return sum(int(line.split()[1]) for line in text.splitlines() if line.startswith(fields)) / 1000


def _uss_mb(pid: int) -> float | None:
    """Private memory (USS): pages no other process maps. A page of the shared cache file that only this process has read yet counts."""
    return _smaps_mb(pid, ("Private_Clean:", "Private_Dirty:"))


def _anon_mb(pid: int) -> float | None:
    """Anonymous memory: heap, tensors and any copy of the data, which no file backs (what one more trial costs)."""
    return _smaps_mb(pid, ("Anonymous:",))


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1000
    except OSError:
        return None
    return None


def _descendants(pid: int) -> list[int]:
    """Every process below pid (Ray's GCS, raylet and workers, started by the driver)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _is_trial_worker(pid: int) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return cmd.startswith("ray::") and ("ImplicitFunc" in cmd or "run_trial" in cmd)


class Sampler:
    """Samples the driver's RSS and USS and each trial worker's USS every half second, keeping the peaks.

    A trial's USS is kept apart for the samples in which all `together` trials ran (trials) and the others (alone); with
    together 1 (bench/gpu.py, bench/overhead.py), every sample counts in trials.
    USS counts a page as private while one process maps it: once the other trials' workers have exited, the code
    pages of torch and Ray that the last one shares with them (about 250 to 290 MB here) count as its own,
    though no memory changed hands."""

    def __init__(self, driver: int, together: int = 1):
        self.driver, self.driver_rss, self.driver_uss, self.driver_anon, self.trials, self.trials_anon = driver, 0.0, 0.0, 0.0, {}, {}
        self.together, self.alone = together, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            self.driver_rss = max(self.driver_rss, _rss_mb(self.driver) or 0.0)
            self.driver_uss = max(self.driver_uss, _uss_mb(self.driver) or 0.0)
            self.driver_anon = max(self.driver_anon, _anon_mb(self.driver) or 0.0)
            workers = {pid: uss for pid in _descendants(self.driver) if _is_trial_worker(pid) and (uss := _uss_mb(pid)) is not None}
            for pid, uss in workers.items():
                kept = self.trials if len(workers) >= self.together else self.alone
                kept[pid] = max(kept.get(pid, 0.0), uss)
                self.trials_anon[pid] = max(self.trials_anon.get(pid, 0.0), _anon_mb(pid) or 0.0)


def _space(path: Path, size: int, trials: int, data_fraction: float) -> Path:
    import yaml

    doc = {
        "name": path.stem,
        "metric": "val_accuracy",
        "mode": "max",
        "num_samples": trials,
        "fixed": {"image_size": size, "epochs": 1, "data_fraction": data_fraction, "batch_size": 64},
        "params": {"lr": {"type": "float", "low": 0.001, "high": 0.05, "log": True}},
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def sweep_at(size: int, data: Path, work: Path, args: argparse.Namespace) -> dict:
    """One real sweep at one image size, as a child process, measured from outside."""
    from asl_tune.results import read_trials

    name = f"fullsize-{size}"
    space = _space(work / f"{name}.yaml", size, args.trials, args.data_fraction)
    ray_tmp = Path(tempfile.mkdtemp(prefix="fsb-", dir="/tmp"))  # Ray's own temp folder for this run: its spill folder is ours to measure
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
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
        "--cpus-per-trial",
        "1",
        "--max-concurrent",
        str(args.trials),
    ]
    say(f"{size} px: {' '.join(cmd[2:])}")
    start = time.monotonic()
    stamps: dict[str, float] = {}
    lines: list[str] = []
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        with Sampler(proc.pid, args.trials) as sampled:
            for line in proc.stderr:
                now = time.monotonic() - start
                lines.append(line.rstrip())
                say(f"  {line.rstrip()[:200]}")
                if line.startswith("decoding") and "decode_start" not in stamps:
                    stamps["decode_start"] = now
                if line.startswith("decoding") and "100%" in line:
                    stamps["decoded"] = now
                if line.startswith(f"sweep '{name}':"):
                    stamps["tune_start"] = now
                if RESULT_LINE.search(line) and "first_result" not in stamps:
                    stamps["first_result"] = now
            proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    wall = time.monotonic() - start
    spilled = sum(f.stat().st_size for f in ray_tmp.rglob("*") if f.is_file() and "spill" in str(f.relative_to(ray_tmp)))
    shutil.rmtree(ray_tmp, ignore_errors=True)
    trials = read_trials(work / "results" / name) if (work / "results" / name / "trials.parquet").exists() else None
    completed = (
        proc.returncode == 0
        and trials is not None
        and len(trials) == args.trials
        and set(trials["status"]) <= {"completed", "stopped_early"}
    )
    decode_start = stamps.get("decode_start", stamps.get("decoded", 0.0))
    return {
        "completed": completed,
        "exit_status": proc.returncode,
        "trial_uss_mb": round(max(sampled.trials.values()), 1) if sampled.trials else None,
        "trial_anon_mb": round(max(sampled.trials_anon.values()), 1) if sampled.trials_anon else None,
        "trial_uss_alone_mb": round(max(sampled.alone.values()), 1) if sampled.alone else None,
        "trial_workers_seen": len(sampled.trials_anon),
        "trial_peak_private_mb": [round(v, 1) for v in trials["peak_private_mb"]]
        if trials is not None and "peak_private_mb" in trials
        else None,
        "driver_uss_mb": round(sampled.driver_uss, 1),
        "driver_anon_mb": round(sampled.driver_anon, 1),
        "driver_rss_mb": round(sampled.driver_rss, 1),
        "spilled_mb": round(spilled / 1e6, 1),
        "decode_s": round(stamps["decoded"] - decode_start, 1) if "decoded" in stamps else None,  # None: decoded by an earlier run
        "handoff_s": round(stamps["tune_start"] - stamps.get("decoded", stamps["tune_start"]), 1) if "tune_start" in stamps else None,
        "first_result_s": round(stamps["first_result"] - stamps["tune_start"], 1)
        if "first_result" in stamps and "tune_start" in stamps
        else None,
        "wall_s": round(wall, 1),
        "plan": next((ln for ln in lines if ln.startswith("memory plan")), None),
        "last_line": lines[-1] if lines else "",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="asl-fullsize-"))
    n_images = 29 * args.per_class
    os.environ.setdefault("ASL_TUNE_CACHE", str(work / "cache"))  # the run's own cache, so the decode is measured (unless --work is reused)
    check_room(n_images, args.sizes, work)
    try:
        say(f"building the stand-in: {n_images:,} images ({args.render_per_class} rendered per class, hard-linked to {args.per_class})")
        data, n_images = build_standin(work / "data", args.per_class, args.render_per_class)
        figures = {
            "n_images": n_images,
            "distinct_jpegs": distinct_files(data),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            **machine(),
            "trials_at_once": args.trials,
            "data_fraction": args.data_fraction,
            "smoke": args.smoke,
        }
        for size in args.sizes:
            figures[str(size)] = sweep_at(size, data, work, args)
        emit(figures, args.json)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
