"""Files -> decoded arrays and splits.

A dataset folder is read once: every image is decoded, converted to RGB, resized to
`image_size` and stored in one uint8 array in a cache keyed by the folder's fingerprint
and the size. Later runs memory-map that array, so no trial decodes a JPEG. A Batcher then
cuts normalised float batches from that array on the device, for training and evaluation alike;
from the cache file it reads each batch's rows with pread (FileRows), so the rows live once in the
page cache, shared by every process on the machine, and a trial's own memory holds only its batch.
This module imports torch only when a Batcher is made, so `asl-tune data check` starts fast.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from asl_tune.config import check_value
from asl_tune.errors import AslTuneError
from asl_tune.files import write_atomically
from asl_tune.workers import run_in_workers

if TYPE_CHECKING:
    import torch

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
KAGGLE_TRAIN = "asl_alphabet_train"
KAGGLE_TEST = "asl_alphabet_test"
SPLIT_FRACTIONS = (0.7, 0.2, 0.1)  # train / val / test, as in the seed
CACHE_VERSION = 2  # bump when the decoded format changes
DECODE_CHUNK = 64  # images per task handed to a decode worker
TO_DEVICE_CHUNK_BYTES = 64 << 20  # Batcher.to_device reads the cache file onto a GPU this much at a time
# The seed's normalisation (per-channel mean and std of the Kaggle images).
MEAN = (0.5119, 0.5042, 0.5128)
STD = (0.2499, 0.2398, 0.2451)


@dataclass
class DecodedDataset:
    """A dataset decoded to one array: images[i] is a (S, S, 3) uint8 RGB image of class labels[i]."""

    root: str  # the folder the images were read from
    classes: list[str]  # class names; label k means classes[k]
    images: np.ndarray  # (N, S, S, 3) uint8, possibly memory-mapped
    labels: np.ndarray  # (N,) int64 class indices
    frames: np.ndarray  # (N,) int64 frame number parsed from the file name (order within a class)
    paths: list[str]  # file paths relative to root, one per image
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (relative path, reason) not decoded
    fingerprint: str = ""  # content fingerprint of the folder the cache was keyed by
    cache_file: str = ""  # the cache's images.npy that `images` maps, on the machine that decoded it ("" when not from the cache)

    @property
    def image_size(self) -> int:
        """Side of every stored image, in pixels."""
        return int(self.images.shape[1])

    def class_counts(self) -> dict[str, int]:
        """Number of decoded images per class, in class order."""
        counts = np.bincount(self.labels, minlength=len(self.classes))
        return {c: int(n) for c, n in zip(self.classes, counts)}


@dataclass(frozen=True)
class Splits:
    """Indices into a DecodedDataset for each split, sorted."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


# ---------------------------------------------------------------- finding files


def _is_image(p: Path) -> bool:
    # Hidden files (.DS_Store, ._M1.jpg from macOS) and Thumbs.db are never images.
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES


def _subdirs(p: Path) -> list[Path]:
    return sorted(d for d in p.iterdir() if d.is_dir() and not d.name.startswith((".", "__")))


def _has_images(p: Path) -> bool:
    return any(_is_image(f) for f in p.iterdir())


def find_class_root(root: Path, what: str = "--data") -> Path:
    """The folder whose sub-folders are the classes: accepts the Kaggle outer folder, either nesting level, or any folder-per-class tree."""
    root = Path(root).expanduser()
    if not root.exists():
        raise AslTuneError(f"{what}: folder does not exist: {root}")
    if not root.is_dir():
        raise AslTuneError(f"{what}: not a folder: {root}")
    here = root
    for _ in range(3):  # outer folder -> asl_alphabet_train -> asl_alphabet_train
        if (here / KAGGLE_TRAIN).is_dir():
            here = here / KAGGLE_TRAIN
            continue
        subs = _subdirs(here)
        if subs and any(_has_images(d) for d in subs):
            return here
        if len(subs) == 1:
            here = subs[0]
            continue
        break
    raise AslTuneError(f"{what}: no class folders (sub-folders holding images) found in {root}")


_FRAME = re.compile(r"(\d+)(?!.*\d)")


def frame_number(name: str) -> int:
    """The frame number in a file name: the last run of digits in its stem (M895.jpg -> 895), or -1."""
    m = _FRAME.search(Path(name).stem)
    return int(m.group(1)) if m else -1


def _list_class_tree(class_root: Path) -> tuple[list[str], list[tuple[Path, int, int]]]:
    """(classes, [(path, label, frame)]) for a folder-per-class tree, in ImageFolder's class order."""
    classes = [d.name for d in _subdirs(class_root)]
    entries = []
    for label, name in enumerate(classes):
        files = sorted((f for f in (class_root / name).iterdir() if _is_image(f)), key=lambda f: (frame_number(f.name), f.name))
        entries += [(f, label, frame_number(f.name)) for f in files]
    return classes, entries


# ---------------------------------------------------------------- decoding


def decode_image(path: Path, size: int) -> np.ndarray:
    """Decode any PIL-readable image to a (size, size, 3) uint8 RGB array: the centre square, resized (the seed's Resize+CenterCrop).

    An image over PIL's decompression-bomb limit (MAX_IMAGE_PIXELS, about 89 million pixels) is refused
    before it is decoded, and only the centre square is resized, so a 1 x 80,000,000 strip never grows
    into a 32 x 2,560,000,000 one.
    """
    import warnings

    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)  # Image.open checks the size the header declares
        with Image.open(path) as img:
            # JPEG draft mode decodes straight to a power-of-two reduced size >= the target: much less work.
            img.draft("RGB", (size, size))
            img = img.convert("RGB")  # grayscale, CMYK, palette and RGBA all become RGB
            w, h = img.size
            side = min(w, h)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.resize((size, size), Image.BILINEAR, box=(left, top, left + side, top + side))
            return np.asarray(img, dtype=np.uint8)


def _decode_chunk(args: tuple[str, int, int, list[str]]) -> list[tuple[int, str]]:
    """Worker: decode paths into rows [start, start+len) of the memory-mapped array; return (row, reason) failures."""
    array_path, size, start, paths = args
    out = np.load(array_path, mmap_mode="r+")
    failures = []
    for i, p in enumerate(paths):
        try:
            out[start + i] = decode_image(Path(p), size)
        except Exception as e:  # a truncated or unreadable file is skipped, never a crash
            failures.append((start + i, f"{type(e).__name__}: {e}".splitlines()[0]))
    out.flush()
    return failures


class Progress:
    """A one-line progress report on stderr: rewritten in place on a terminal, a line every few seconds otherwise."""

    def __init__(self, what: str, total: int, enabled: bool = True):
        self.what, self.total, self.enabled = what, total, enabled
        self.done, self.start, self.last = 0, time.monotonic(), 0.0
        self.tty = sys.stderr.isatty()

    def update(self, n: int) -> None:
        """Count n more items done."""
        self.done += n
        now = time.monotonic()
        if not self.enabled or (now - self.last < (0.2 if self.tty else 5.0) and self.done < self.total):
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        line = f"{self.what}: {self.done}/{self.total} ({100 * self.done / max(self.total, 1):.0f}%, {rate:.0f}/s)"
        print(("\r" + line) if self.tty else line, end="" if self.tty else "\n", file=sys.stderr, flush=True)
        if self.tty and self.done >= self.total:
            print(file=sys.stderr)


def _decode_all(paths: list[Path], size: int, array_path: Path, workers: int, progress: bool) -> dict[int, str]:
    """Decode every path into a new (N, size, size, 3) .npy at array_path, in parallel; return {row: reason} for failures."""
    arr = np.lib.format.open_memmap(array_path, mode="w+", dtype=np.uint8, shape=(len(paths), size, size, 3))
    del arr
    tasks = [(str(array_path), size, s, [str(p) for p in paths[s : s + DECODE_CHUNK]]) for s in range(0, len(paths), DECODE_CHUNK)]
    bar = Progress(f"decoding {len(paths)} images at {size} px", len(paths), progress)
    failures: dict[int, str] = {}
    # Worker processes that never re-run the caller's __main__ (asl_tune.workers says why).
    for t, fails in run_in_workers(_decode_chunk, tasks, workers):
        failures.update(fails)
        bar.update(len(t[3]))
    return failures


# ---------------------------------------------------------------- the cache


def cache_root() -> Path:
    """Where decoded arrays and the default dataset live: $ASL_TUNE_CACHE, else $XDG_CACHE_HOME/asl-tune, else ~/.cache/asl-tune."""
    if os.environ.get("ASL_TUNE_CACHE"):
        return Path(os.environ["ASL_TUNE_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "asl-tune"


def fingerprint(root: Path, entries: list[tuple[Path, int, int]], classes: list[str]) -> str:
    """A key that changes when any file is added, removed, renamed, resized or rewritten (path, size, mtime)."""
    h = hashlib.sha256(f"v{CACHE_VERSION}|{'|'.join(classes)}".encode())
    for p, label, _ in entries:
        st = p.stat()
        h.update(f"{p.relative_to(root)}|{label}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def _build(root: Path, classes: list[str], entries: list[tuple[Path, int, int]], size: int, key: str, workers: int, progress: bool) -> Path:
    """Decode into a temporary folder and rename it into place (files.write_atomically), so a killed build never looks finished."""
    final = cache_root() / "decoded" / f"{key}-{size}px"
    try:
        write_atomically(final, lambda tmp: _decode_into(tmp, root, classes, entries, size, key, workers, progress))
    except FileExistsError:
        pass  # another process finished the same cache first: theirs is as good as ours
    return final


def _decode_into(
    tmp: Path, root: Path, classes: list[str], entries: list[tuple[Path, int, int]], size: int, key: str, workers: int, progress: bool
) -> None:
    """Decode every entry into the new folder tmp: images.npy (the readable ones) and meta.json."""
    tmp.mkdir(parents=True)
    failures = _decode_all([p for p, _, _ in entries], size, tmp / "all.npy", workers, progress)
    keep = [i for i in range(len(entries)) if i not in failures]
    if failures:  # rare: copy the good rows into a compact array
        allrows = np.load(tmp / "all.npy", mmap_mode="r")
        out = np.lib.format.open_memmap(tmp / "images.npy", mode="w+", dtype=np.uint8, shape=(len(keep), size, size, 3))
        for s in range(0, len(keep), 1024):
            out[s : s + 1024] = allrows[keep[s : s + 1024]]
        out.flush()
        del out, allrows
        (tmp / "all.npy").unlink()
    else:
        (tmp / "all.npy").rename(tmp / "images.npy")
    meta = {
        "root": str(root),
        "classes": classes,
        "labels": [entries[i][1] for i in keep],
        "frames": [entries[i][2] for i in keep],
        "paths": [str(entries[i][0].relative_to(root)) for i in keep],
        "skipped": [[str(entries[i][0].relative_to(root)), why] for i, why in sorted(failures.items())],
        "fingerprint": key,
    }
    (tmp / "meta.json").write_text(json.dumps(meta))


def _load_cached(folder: Path) -> DecodedDataset:
    meta = json.loads((folder / "meta.json").read_text())
    return DecodedDataset(
        root=meta["root"],
        classes=list(meta["classes"]),
        images=np.load(folder / "images.npy", mmap_mode="r"),
        labels=np.asarray(meta["labels"], dtype=np.int64),
        frames=np.asarray(meta["frames"], dtype=np.int64),
        paths=list(meta["paths"]),
        skipped=[tuple(s) for s in meta["skipped"]],
        fingerprint=meta["fingerprint"],
        cache_file=str(folder / "images.npy"),
    )


def _cached_decode(
    root: Path, classes: list[str], entries: list[tuple[Path, int, int]], size: int, progress: bool, workers: int | None
) -> DecodedDataset:
    key = fingerprint(root, entries, classes)
    folder = cache_root() / "decoded" / f"{key}-{size}px"
    if not (folder / "meta.json").exists():
        workers = workers or min(os.cpu_count() or 1, 8)
        folder = _build(root, classes, entries, size, key, workers, progress)
    return _load_cached(folder)


def load_dataset(root: Path, image_size: int, progress: bool = True, workers: int | None = None, what: str = "--data") -> DecodedDataset:
    """Decode a folder-per-class dataset (or the Kaggle layout) at image_size, through the cache."""
    class_root = find_class_root(root, what)
    classes, entries = _list_class_tree(class_root)
    ds = _cached_decode(class_root, classes, entries, image_size, progress, workers)
    empty = [c for c, n in ds.class_counts().items() if n == 0]
    if empty:
        raise AslTuneError(f"{what}: class folder(s) with no readable image: {', '.join(empty)} in {class_root}")
    return ds


def decoded_bytes(n_images: int, image_size: int) -> int:
    """Bytes of the decoded (N, S, S, 3) uint8 array for n_images at image_size (what the cache file holds, less its header)."""
    return n_images * image_size * image_size * 3


def size_text(n_bytes: float) -> str:
    """Bytes for people: "10.44 GB", "63 MB" under a gigabyte, "92 kB" under a megabyte (decimal units, as `df -H` counts)."""
    if n_bytes >= 0.995e9:
        return f"{n_bytes / 1e9:.2f} GB"
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes >= 0.995e6 else f"{n_bytes / 1e3:.0f} kB"


def count_images(root: Path, what: str = "--data") -> int:
    """How many images a dataset folder holds, without decoding any (the memory plan's N: an upper bound, as unreadable files are skipped later)."""
    return len(_list_class_tree(find_class_root(root, what))[1])


_KAGGLE_TEST_NAME = re.compile(r"^(.+)_test$")


def load_external(root: Path, classes: list[str], image_size: int, progress: bool = True, option: str = "--external") -> DecodedDataset:
    """Decode an extra evaluation set: the Kaggle test folder (<class>_test.jpg, flat) or any folder-per-class tree, labelled with the training classes.

    `option` is how the user named the folder, for error messages.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise AslTuneError(f"{option}: folder does not exist: {root}")
    here = root
    for _ in range(2):  # asl_alphabet_test/asl_alphabet_test
        if (here / KAGGLE_TEST).is_dir():
            here = here / KAGGLE_TEST
    flat = sorted(f for f in here.iterdir() if _is_image(f)) if here.is_dir() else []
    if flat and not _subdirs(here):
        entries = []
        for f in flat:
            m = _KAGGLE_TEST_NAME.match(f.stem)
            name = m.group(1) if m else None
            if name not in classes:
                raise AslTuneError(f"{option}: {f.name}: flat files must be named <class>_test.<ext> with a training class, got {f.name!r}")
            entries.append((f, classes.index(name), 0))
        class_root = here
    else:
        class_root = find_class_root(root, option)
        ext_classes, raw = _list_class_tree(class_root)
        unknown = [c for c in ext_classes if c not in classes]
        if unknown:
            raise AslTuneError(f"{option}: class folder(s) not among the training classes: {', '.join(unknown)} in {class_root}")
        entries = [(p, classes.index(ext_classes[label]), fr) for p, label, fr in raw]
    ds = _cached_decode(class_root, list(classes), entries, image_size, progress, workers=None)
    if len(ds.labels) == 0:
        raise AslTuneError(f"{option}: no readable image in {class_root}")
    return ds


# ---------------------------------------------------------------- splits


def _split_counts(n: int) -> tuple[int, int]:
    n_train = round(n * SPLIT_FRACTIONS[0])
    n_val = round(n * SPLIT_FRACTIONS[1])
    return n_train, min(n_val, n - n_train)


def make_splits(labels: np.ndarray, frames: np.ndarray, mode: str, seed: int) -> Splits:
    """Stratified 70/20/10 splits. "blocked": each class's frames in order, cut into contiguous blocks; "random": a seeded shuffle per class."""
    if (why := check_value("split", mode)) is not None:  # the rule lives in config
        raise AslTuneError(f"split: {why}, got {mode!r}")
    rng = np.random.default_rng(seed)
    parts: tuple[list, list, list] = ([], [], [])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if mode == "blocked":
            # Near-copy neighbouring frames stay on one side of each cut; only the 2 boundaries leak.
            idx = idx[np.argsort(frames[idx], kind="stable")]
        else:
            idx = rng.permutation(idx)
        n_train, n_val = _split_counts(len(idx))
        parts[0].append(idx[:n_train])
        parts[1].append(idx[n_train : n_train + n_val])
        parts[2].append(idx[n_train + n_val :])
    train, val, test = (np.sort(np.concatenate(p)) if p else np.array([], dtype=np.int64) for p in parts)
    return Splits(train=train, val=val, test=test)


def subsample(train: np.ndarray, labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """A seeded, stratified share of the training indices (at least one per class); val and test are never touched."""
    if (why := check_value("data_fraction", float(fraction))) is not None:
        raise AslTuneError(f"data_fraction: {why}, got {fraction}")
    if fraction == 1:
        return train
    rng = np.random.default_rng([seed, 1])
    keep = []
    for c in np.unique(labels[train]):
        idx = train[labels[train] == c]
        k = max(1, round(fraction * len(idx)))
        keep.append(rng.choice(idx, size=k, replace=False))
    return np.sort(np.concatenate(keep))


def describe(ds: DecodedDataset, split: str = "blocked", seed: int = 0, sizes: tuple[int, ...] = (64, 200)) -> str:
    """A human report for `asl-tune data check`: classes and counts, split sizes, the decoded size at each of `sizes`, skipped files."""
    s = make_splits(ds.labels, ds.frames, split, seed)
    lines = [f"dataset: {ds.root}", f"classes: {len(ds.classes)}, images: {len(ds.labels)}, skipped: {len(ds.skipped)}"]
    counts = ds.class_counts()
    lines += [f"  {c:<8} {n}" for c, n in counts.items()]
    lines.append(f"split ({split}, seed {seed}): train {len(s.train)}, val {len(s.val)}, test {len(s.test)}")
    # What a sweep holds once per node (the cache file in the page cache, or in Ray's object store): the memory plan's figure.
    lines.append(
        "decoded size: " + ", ".join(f"{size_text(decoded_bytes(len(ds.labels), size))} at {size} px" for size in sorted(set(sizes)))
    )
    for path, why in ds.skipped:
        lines.append(f"skipped {path}: {why}")
    return "\n".join(lines)


# ---------------------------------------------------------------- batches


class FileRows:
    """Rows of a read-only memory-mapped .npy (the cache file), read with pread instead of through the mapping.

    Read through a mapping, every page a process touches stays mapped into it until it exits: a trial
    that has validated on 17,400 images at 200 px holds 2 GB of the file's pages, which count as its own
    memory (USS, what Ray's memory monitor and `top` see) while no other trial has touched them. Read with
    pread, the pages stay in the kernel's page cache, one copy per machine for every process, and the
    process holds only the rows it asked for. Consecutive rows are one read.
    """

    def __init__(self, array: np.memmap):
        self.path, self.offset = str(array.filename), int(array.offset)
        self.n, self.row_shape, self.dtype = array.shape[0], array.shape[1:], array.dtype
        self.row_bytes = int(np.prod(self.row_shape)) * array.dtype.itemsize
        self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    @staticmethod
    def readable(array: np.ndarray) -> bool:
        """Whether array is a whole C-ordered file mapping (np.load's mmap_mode), whose rows FileRows can read from its file."""
        whole = isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.flags.c_contiguous and bool(array.filename)
        return whole and hasattr(os, "preadv")  # not on Windows: there the rows are read through the mapping

    def read_into(self, rows: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Copy the given rows, in order, into out (len(rows), *row_shape), one pread per run of consecutive rows; returns out."""
        rows = np.asarray(rows, dtype=np.int64)
        if not len(rows):
            return out
        bad = rows[(rows < 0) | (rows >= self.n)]
        if len(bad):
            raise IndexError(f"row {int(bad[0])} is out of range for {self.n} rows of {self.path}")
        flat = out.reshape(len(rows), self.row_bytes // self.dtype.itemsize).view(np.uint8)  # a view: out must be contiguous
        ends = np.append(np.flatnonzero(np.diff(rows) != 1) + 1, len(rows))
        start = 0
        for end in ends.tolist():
            view, at = memoryview(flat[start:end]).cast("B"), self.offset + int(rows[start]) * self.row_bytes
            while len(view):  # a read may return less than asked (over 2 GB at once, a signal)
                got = os.preadv(self.fd, [view], at)
                if got <= 0:
                    raise OSError(f"{self.path} ended early: {len(view)} bytes short at byte {at}")
                view, at = view[got:], at + got
            start = end
        return out

    def __del__(self) -> None:
        if getattr(self, "fd", None) is not None:
            os.close(self.fd)
            self.fd = None


def mapped_bytes(path: str) -> int | None:
    """Bytes of path's pages mapped into this process now (the Rss of its mappings in /proc/self/smaps); None off Linux."""
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return None
    target, total, inside = str(Path(path).resolve()), 0, False
    for line in lines:
        first = line.split(None, 1)[0] if line else ""
        if "-" in first and not first.endswith(":"):  # a mapping's header: address range, perms, offset, device, inode, path
            inside = line.rstrip().endswith(target)
        elif inside and first == "Rss:":
            total += int(line.split()[1]) * 1024
    return total


class Batcher:
    """Turns rows of a (N, S, S, 3) uint8 image array into normalised (B, 3, S, S) float batches on a device.

    On a GPU the array either lives on it (to_device, when it fits) or stays in host memory, and each
    batch's rows are gathered into pinned memory and copied over without waiting (non_blocking). Rows
    of the cache file are read from the file (FileRows), never through its mapping.
    """

    def __init__(self, images: np.ndarray, device: torch.device, channels_last: bool):
        import warnings

        import torch  # here, not at the top: reading and splitting data needs no torch

        with warnings.catch_warnings():  # the array is read-only (memory map, Ray's object store); we never write it
            warnings.simplefilter("ignore", UserWarning)
            self.images = torch.from_numpy(images) if isinstance(images, np.ndarray) else images
        self.file = FileRows(images) if isinstance(images, np.ndarray) and FileRows.readable(images) else None
        self.device, self.channels_last = device, channels_last
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
        self.scale, self.shift = 1 / (255 * std), mean / std

    @property
    def pinned(self) -> bool:
        """Whether batches cross to a GPU through pinned host memory (the array stays on the host); never on the CPU."""
        return self.device.type == "cuda" and self.images.device.type == "cpu"

    @property
    def rows_device(self) -> torch.device:
        """Where batch() wants its row indices: beside the array, so no index crosses the bus (and waits) per batch."""
        return self.images.device

    def to_device(self) -> None:
        """Keep the whole uint8 array on the device, so batches never cross the bus (GPU, when it fits)."""
        import torch

        if self.file is None:
            self.images = self.images.to(self.device)
            return
        on_device = torch.empty(tuple(self.images.shape), dtype=self.images.dtype, device=self.device)
        step = max(1, TO_DEVICE_CHUNK_BYTES // self.file.row_bytes)
        for s in range(0, self.file.n, step):  # through one pinned buffer a chunk at a time: no mapping, no whole copy on the host
            rows = np.arange(s, min(s + step, self.file.n))
            staged = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=self.device.type == "cuda")
            self.file.read_into(rows, staged.numpy())
            on_device[s : s + len(rows)].copy_(staged)
        self.images, self.file = on_device, None

    def batch(self, rows: torch.Tensor) -> torch.Tensor:
        """Normalised batch for the given row indices."""
        x = self._gather(rows)  # (B, S, S, 3) uint8, on the device
        # (B, S, S, 3) uint8 -> (B, 3, S, S) float, normalised
        x = x.permute(0, 3, 1, 2).float().mul_(self.scale).sub_(self.shift)
        return x.contiguous(memory_format=self.memory_format)

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        import torch

        if not self.pinned and self.file is None:
            return self.images[rows.to(self.images.device)].to(self.device)
        # A fresh pinned buffer per batch: torch's pinned-memory cache hands a block out again only once
        # the copies that read it have finished, so the next batch cannot overwrite one still in flight.
        rows = rows.cpu()
        staged = torch.empty((len(rows), *self.images.shape[1:]), dtype=self.images.dtype, pin_memory=self.pinned)
        if self.file is not None:
            self.file.read_into(rows.numpy(), staged.numpy())
        else:
            torch.index_select(self.images, 0, rows, out=staged)
        return staged.to(self.device, non_blocking=True) if self.pinned else staged
