"""How the decoded arrays reach the trials, one copy per node, and the memory plan that says a sweep fits.

Every trial reads its image size's decoded array (data.py). On a node that has the cache file the driver
decoded (the driver's own node; any node that sees the same cache folder), every trial opens that file
read-only and reads each batch's rows from it with pread (data.FileRows): the rows are the kernel's page
cache, one copy shared by all trials on the node, and nothing crosses Ray. A node without the file gets
the array from Ray's object store: the driver puts it there once, as a plain ndarray (a memmap would pickle
its bytes, and each trial would unpickle a private, writable copy), and every trial on that node maps the
store's read-only copy (Ray's zero-copy numpy).

So a trial's private memory does not grow with the dataset, and neither does the driver's: it reads the
cache file only to hand it to the object store. The plan, made before anything is decoded, checks each node against what it will hold:
the data once (page cache or object store), and its trials at once, each about `trial_mb(size)`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from asl_tune.data import DecodedDataset, cache_root, count_images, decoded_bytes, mapped_bytes, size_text
from asl_tune.errors import AslTuneError

# A trial's own memory besides the data (Ray worker, torch, the network, its optimiser, batches and what the
# allocator keeps of them): bench/fullsize.py's peak anonymous memory of a trial on the 2-core box, 2026-12-06,
# 580 MB at 64 px and 1,076 MB at 200 px (87,000 images, batch 64, 2 trials at once), as a line in pixels.
TRIAL_BASE_MB = 525
TRIAL_MB_PER_KPIXEL = 14  # more per 1,000 pixels of image area
PUT_PROGRESS_S = 5.0  # seconds between the hand-off's progress lines: never silent for 10 s
HEADROOM = 0.9  # of a node's memory the plan lets trials and data fill; the rest is the system's and Ray's own


def trial_mb(image_size: int) -> float:
    """The memory one trial needs beside the data, in MB, at image_size (the plan's estimate, from measured figures)."""
    return TRIAL_BASE_MB + TRIAL_MB_PER_KPIXEL * image_size * image_size / 1000


@dataclass(frozen=True)
class Node:
    """What the plan knows of one Ray node."""

    node_id: str
    address: str
    cpus: float
    gpus: float
    memory_bytes: float  # the node's memory Ray may use (its heap plus its object store)
    object_store_bytes: float
    has_cache: bool  # sees the driver's cache files, so its trials map them and need no object-store copy


def nodes(local: bool) -> list[Node]:
    """The cluster's alive nodes, and which of them see this machine's cache folder: a local Ray's one node is this
    machine; on a cluster, each node is asked (cluster.nodes_seeing: a marker file the driver writes there)."""
    import ray

    from asl_tune.sweep.cluster import nodes_seeing

    if local:
        seen = {n["NodeID"]: True for n in ray.nodes() if n.get("Alive")}
    else:
        root = cache_root()
        root.mkdir(parents=True, exist_ok=True)
        seen = {n["NodeID"]: sees for n, sees in nodes_seeing(root).items()}
    out = []
    for n in ray.nodes():
        if n["NodeID"] not in seen:
            continue
        r = n.get("Resources", {})
        out.append(
            Node(
                n["NodeID"],
                n.get("NodeManagerAddress", "?"),
                float(r.get("CPU", 0)),
                float(r.get("GPU", 0)),
                float(r.get("memory", 0)) + float(r.get("object_store_memory", 0)),
                float(r.get("object_store_memory", 0)),
                seen[n["NodeID"]],
            )
        )
    return out


@dataclass(frozen=True)
class Plan:
    """Whether a sweep fits: the data's size, and each node's share of trials and memory."""

    data_bytes: int  # the decoded arrays of every image size the space uses (and the external set's)
    per_size: dict[int, int]  # bytes at each image size
    at_once: dict[str, int]  # node id -> trials it runs at once
    trial_mb: float  # the largest trial's estimate
    lines: list[str]  # what the plan says before the sweep starts

    def say(self) -> None:
        """Print the plan's lines on stderr."""
        for line in self.lines:
            print(line, file=sys.stderr)


def plan(
    data: Path,
    external: Path | None,
    sizes: list[int],
    cluster_nodes: list[Node],
    cpus_per_trial: float,
    gpus_per_trial: float,
    max_concurrent: int | None,
    num_samples: int,
) -> Plan:
    """The memory plan, before anything is decoded; refuses (AslTuneError, one line) a sweep that cannot fit, with the ways out.

    Long: every node's check and the plan's line in one place, so the refusal and the figures it names cannot drift apart.
    """
    n = count_images(data)
    n_ext = _count_external(external) if external else 0
    per_size = {s: decoded_bytes(n + n_ext, s) for s in sizes}
    total = sum(per_size.values())
    need_trial = max(trial_mb(s) for s in sizes) * 1e6
    _check_disk(total, per_size)
    at_once, lines, problems = {}, [], []
    left = min(num_samples, max_concurrent or num_samples)
    for node in sorted(cluster_nodes, key=lambda nd: -nd.cpus):  # Ray fills the larger nodes first as well
        k = _fits_trials(node, cpus_per_trial, gpus_per_trial)
        k = min(k, left)
        left -= k
        at_once[node.node_id] = k
        if k == 0:
            continue
        held = total if not node.has_cache else 0  # the object store's copy counts against memory; page cache does not need to stay
        need = k * need_trial + held
        if not node.has_cache and node.object_store_bytes < total:
            problems.append(
                f"node {node.address} has no cache file and its object store holds {size_text(node.object_store_bytes)}, "
                f"less than the {size_text(total)} of data; start its Ray with a larger --object-store-memory, give it the cache folder, "
                f"or use a smaller image size"
            )
        elif need > HEADROOM * node.memory_bytes:
            problems.append(
                f"node {node.address} would run {k} trials at once, about {size_text(need_trial)} each"
                + (f" beside {size_text(held)} of data in its object store" if held else "")
                + f": {size_text(need)} of its {size_text(node.memory_bytes)}; run fewer at once (--max-concurrent {max(1, int((HEADROOM * node.memory_bytes - held) // need_trial))}),"
                f" more CPUs per trial (--cpus-per-trial), a smaller image size, or give it more memory"
            )
        if node.has_cache and need + total > node.memory_bytes:
            lines.append(
                f"memory plan: the data ({size_text(total)}) and {k} trials do not fit in the memory of node {node.address} "
                f"({size_text(node.memory_bytes)}) together: its trials will read the cache file from disk as they go, more slowly"
            )
    if problems:
        raise AslTuneError(f"memory plan: {'; '.join(problems)}")
    sizes_text = ", ".join(f"{size_text(b)} at {s} px" for s, b in per_size.items())
    shared = sum(1 for nd in cluster_nodes if nd.has_cache and at_once.get(nd.node_id))
    shipped = sum(1 for nd in cluster_nodes if not nd.has_cache and at_once.get(nd.node_id))
    how = []
    if shared:
        how.append(f"read from the cache file (page cache) on {shared} node{'s' if shared > 1 else ''}")
    if shipped:
        how.append(f"one object-store copy on each of {shipped} node{'s' if shipped > 1 else ''} without the cache")
    runs = sum(at_once.values())
    lines.append(
        f"memory plan: {n + n_ext:,} images, {sizes_text}, {' and '.join(how) or 'read from the cache file (page cache)'}, shared by every trial on a node; "
        f"{runs} trial{'s' if runs != 1 else ''} at once, about {size_text(need_trial)} each: fits"
    )
    return Plan(total, per_size, at_once, need_trial / 1e6, lines)


def _fits_trials(node: Node, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """Trials this node can run at once by its CPUs and GPUs."""
    k = math.floor(node.cpus / cpus_per_trial + 1e-9) if cpus_per_trial > 0 else 10**6
    if gpus_per_trial > 0:
        k = min(k, math.floor(node.gpus / gpus_per_trial + 1e-9))
    return max(0, k)


def _count_external(external: Path) -> int:
    from asl_tune.data import _is_image

    return sum(1 for f in Path(external).rglob("*") if _is_image(f))


def _check_disk(total: int, per_size: dict[int, int]) -> None:
    """Refuse when the cache folder's disk cannot hold the arrays not yet decoded (a full disk mid-decode helps no one)."""
    root = cache_root()
    probe = root
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if total > free:
        raise AslTuneError(
            f"memory plan: the decoded data needs {size_text(total)} in the cache folder {root}, which has {size_text(free)} free; "
            "set ASL_TUNE_CACHE to a larger disk, or use a smaller image size"
        )


# ---------------------------------------------------------------- the hand-off


@dataclass
class SharedDataset:
    """A decoded dataset as the trial function receives it: its labels and names, the cache file's path, and, for
    nodes without that file, the array's place in Ray's object store. Small to pickle; `open` gives the array."""

    meta: DecodedDataset  # images: an empty (0, S, S, 3) placeholder
    cache_file: str
    cache_bytes: int  # the file's size, so a node's file of another size is not taken for it
    ref: object | None = None  # ray.ObjectRef of the (N, S, S, 3) array, for nodes without the file

    def open(self) -> DecodedDataset:
        """The dataset on this node: the cache file mapped read-only where it is here (a Batcher reads its rows with pread), else the
        object store's read-only copy."""
        path = Path(self.cache_file)
        if self.cache_file and path.is_file() and path.stat().st_size == self.cache_bytes:
            images = np.load(path, mmap_mode="r")
        elif self.ref is not None:
            import ray

            images = ray.get(self.ref)  # zero-copy: a read-only view of the node's object store
        else:
            raise RuntimeError(f"this node has no {self.cache_file} and the driver put no copy in Ray's object store")
        return dataclasses.replace(self.meta, images=images)


def share(datasets: dict[int, DecodedDataset], cluster_nodes: list[Node]) -> dict[int, SharedDataset]:
    """The datasets as the trials get them; put into Ray's object store (once, with progress) only if some node lacks the cache."""
    ship = any(not nd.has_cache for nd in cluster_nodes)
    out = {}
    for size, ds in datasets.items():
        ref = _put_with_progress(ds) if ship else None
        meta = dataclasses.replace(ds, images=np.empty((0, *ds.images.shape[1:]), dtype=np.uint8))
        size_on_disk = os.path.getsize(ds.cache_file) if ds.cache_file else 0
        out[size] = SharedDataset(meta, ds.cache_file, size_on_disk, ref)
    return out


def _put_with_progress(ds: DecodedDataset):
    """ray.put of the array as a plain ndarray (zero-copy for trials), a line with the bytes done every PUT_PROGRESS_S while it is copied."""
    import ray

    array = np.asarray(ds.images)  # a memmap's ndarray view: put copies its bytes once; a memmap would pickle them
    what = f"handing {size_text(array.nbytes)} ({ds.image_size} px) to Ray's object store for the nodes without the cache"
    print(what, file=sys.stderr, flush=True)
    done = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not done.wait(PUT_PROGRESS_S):
            print(f"{what}: {put_progress(ds, time.monotonic() - start)}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        return ray.put(array)
    finally:
        done.set()
        thread.join()
        print(f"{what}: done in {time.monotonic() - start:.1f} s", file=sys.stderr, flush=True)


def put_progress(ds: DecodedDataset, elapsed_s: float) -> str:
    """How far ray.put has copied the cache file: ray.put is one call, but it reads the file through this process's
    mapping front to back, so the mapping's resident bytes (/proc/self/smaps) are the bytes done."""
    done = mapped_bytes(ds.cache_file) if ds.cache_file else None
    total = ds.images.nbytes
    so_far = f"{elapsed_s:.0f} s so far"
    return so_far if done is None else f"{size_text(min(done, total))} of {size_text(total)} ({min(done, total) / total:.0%}), {so_far}"
