"""Judging a trained DexNet: accuracy, confusions, per-class rates, and how fast it runs."""

from __future__ import annotations

import ctypes
import ctypes.util
import time

import numpy as np
import torch
from torch import nn

from asl_tune.alphabet import WATCH_PAIRS
from asl_tune.config import Timed
from asl_tune.data import Batcher
from asl_tune.results import FRAME_BUDGET_MS

TOP_PAIRS = 5  # most-confused pairs reported per trial
# Images per evaluation batch: 256 keeps a GPU busy; on a CPU, 64 is faster (2026-12-05, DexNet 512, 1,536 images:
# 395 vs 366 img/s at 64 px on 1 thread, 47 vs 41 at 200 px) and a 200 px trial's peak memory in evaluation falls
# from 1,241 to 808 MB (anonymous; bench/RESULTS.md §5).
EVAL_BATCH = {"cuda": 256, "cpu": 64}


def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another system)."""
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Hand the pages the C heap holds free back to the system. After an evaluation its batches are freed, but glibc
    keeps freed memory for reuse below the heap's top; a trial waits out its next epoch's training holding it."""
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


def eval_batch(device: torch.device) -> int:
    """Images per evaluation batch on this device (EVAL_BATCH; a device not named there takes the GPU's)."""
    return EVAL_BATCH.get(device.type, EVAL_BATCH["cuda"])


def autocast_to(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """A context that runs the network at dtype (torch.bfloat16, torch.float16) on device, or at full precision for None."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.inference_mode()
def predict(
    model: nn.Module, batcher: Batcher, rows: np.ndarray, labels: np.ndarray, autocast: torch.dtype | None = None
) -> tuple[np.ndarray, float]:
    """(predicted class per row, mean cross-entropy) in eval mode, under autocast to that dtype (None: full precision).

    Losses and predictions stay on the device until the end: one wait for a GPU, not one per batch.
    """
    model.eval()
    rows_t = torch.from_numpy(np.asarray(rows, dtype=np.int64))
    image_rows = rows_t.to(batcher.rows_device)
    y_all = torch.from_numpy(np.asarray(labels, dtype=np.int64))[rows_t].to(batcher.device)  # (N,) the rows' classes
    # Filled in place: a small tensor kept per batch would sit between the batches' large freed blocks
    # and hold the heap from shrinking (a 64 px validation grew a trial's memory by 300 MB that way).
    preds = torch.empty(len(rows_t), dtype=torch.int64, device=batcher.device)
    loss_sum = torch.zeros((), dtype=torch.float64, device=batcher.device)
    step = eval_batch(batcher.device)
    for s in range(0, len(rows_t), step):
        x = batcher.batch(image_rows[s : s + step])
        with autocast_to(batcher.device, autocast):
            logits = model(x)
        loss_sum += nn.functional.cross_entropy(logits.float(), y_all[s : s + step], reduction="sum")
        preds[s : s + step] = logits.argmax(1)
    n = max(len(rows_t), 1)
    out = preds.cpu().numpy(), float(loss_sum) / n
    trim_heap()
    return out


def confusion_matrix(true: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) int64 counts: row = true class, column = predicted class."""
    return np.bincount(true * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_rates(cm: np.ndarray, classes: list[str]) -> list[dict]:
    """Precision, recall, false-positive and false-negative rate per class (NaN where undefined)."""
    total = cm.sum()
    tp = np.diag(cm).astype(float)
    support = cm.sum(1).astype(float)
    predicted = cm.sum(0).astype(float)
    negatives = total - support
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / predicted
        recall = tp / support
        fpr = (predicted - tp) / negatives
    return [
        {
            "class_name": c,
            "support": int(support[k]),
            "precision": float(precision[k]),
            "recall": float(recall[k]),
            "fpr": float(fpr[k]),
            "fnr": float(1 - recall[k]),
        }
        for k, c in enumerate(classes)
    ]


def pair_rates(cm: np.ndarray, classes: list[str], top: int = TOP_PAIRS) -> dict[str, float]:
    """Share of true X predicted as Y, as {"pair_X_as_Y": rate}: the seed's watch-list, then the `top` most confused pairs."""
    support = cm.sum(1)
    rates: dict[str, float] = {}

    def rate(t: int, p: int) -> float:
        return float(cm[t, p] / support[t]) if support[t] else float("nan")

    for x, y in WATCH_PAIRS:
        if x in classes and y in classes:
            rates[f"pair_{x}_as_{y}"] = rate(classes.index(x), classes.index(y))
    off = cm.astype(float).copy()
    np.fill_diagonal(off, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = np.nan_to_num(off / support[:, None])
    for flat in np.argsort(-shares, axis=None, kind="stable")[:top]:
        t, p = divmod(int(flat), len(classes))
        if off[t, p] > 0:
            rates[f"pair_{classes[t]}_as_{classes[p]}"] = rate(t, p)
    return rates


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def measure_speed(
    model: nn.Module,
    batcher: Batcher,
    rows: np.ndarray,
    autocast: torch.dtype | None = None,
    budget_s: float = 1.0,
    timed: Timed | None = None,
) -> dict[str, float]:
    """Inference img/s at batch 64 and batch-1 latency p50/p95 (ms) on real images, uint8 -> logits, after warm-up.

    autocast: the dtype the trial runs at (None: full precision), so speed is measured at the trial's precision.
    Each kind of run is repeated for about budget_s seconds (a trial's figure), or exactly `timed`'s counts.
    """
    model.eval()
    rows_t = torch.from_numpy(np.resize(np.asarray(rows, dtype=np.int64), 64)).to(batcher.rows_device)
    dev = batcher.device
    # Untimed runs first, batches then single images: first-call allocation and kernel selection stay out of the figures.
    batch_warmup, single_warmup = (timed.warmup, timed.warmup) if timed else (1, 3)

    def run(r: torch.Tensor) -> None:
        with autocast_to(dev, autocast):
            model(batcher.batch(r))

    def more(done: int, least: int, most: int, start: float) -> bool:
        """Whether to time another run: `timed`'s count, else until the budget is spent (at least `least`, at most `most`)."""
        if timed is not None:
            return done < most
        return done < least or (time.perf_counter() - start < budget_s and done < most)

    for _ in range(batch_warmup):
        run(rows_t)
    _sync(dev)
    if timed is not None:
        infer_img_per_s = _median_rate(run, rows_t, timed.batches, timed.rounds, dev)
    else:
        n, start = 0, time.perf_counter()
        while more(n, 2, 200, start):
            run(rows_t)
            n += 1
        _sync(dev)
        infer_img_per_s = 64 * n / (time.perf_counter() - start)
    for i in range(single_warmup):
        run(rows_t[i % 64 : i % 64 + 1])
    lat: list[float] = []
    start = time.perf_counter()
    while more(len(lat), 10, timed.latencies if timed else 300, start):
        t0 = time.perf_counter()
        run(rows_t[len(lat) % 64 : len(lat) % 64 + 1])
        _sync(dev)
        lat.append((time.perf_counter() - t0) * 1000)
    p50, p95 = (float(v) for v in np.percentile(lat, [50, 95]))
    return {
        "infer_img_per_s": infer_img_per_s,
        "latency_ms_p50": p50,
        "latency_ms_p95": p95,
        "keeps_up_30fps": bool(p95 <= FRAME_BUDGET_MS),
    }


def _median_rate(run, rows_t: torch.Tensor, batches: int, rounds: int, dev: torch.device) -> float:
    """Images a second at batch 64: `batches` runs in `rounds` groups (as equal as they split), each group timed, the median rate kept."""
    rates = []
    for size in np.diff(np.linspace(0, batches, min(rounds, batches) + 1).round().astype(int)):
        start = time.perf_counter()
        for _ in range(size):
            run(rows_t)
        _sync(dev)
        rates.append(64 * size / (time.perf_counter() - start))
    return float(np.median(rates))


def score(model: nn.Module, images: np.ndarray, labels: np.ndarray, classes: list[str], device: torch.device) -> dict:
    """Accuracy, mean loss, the confusion pairs and per-class rates of a trained network on every image of a set."""
    batcher = Batcher(images, device, channels_last=False)
    pred, loss = predict(model.to(device), batcher, np.arange(len(labels)), labels)
    cm = confusion_matrix(labels, pred, len(classes))
    metrics = {"images": int(len(labels)), "accuracy": float(np.trace(cm) / max(cm.sum(), 1)), "loss": loss, **pair_rates(cm, classes)}
    return {"metrics": metrics, "confusion": cm.tolist(), "per_class": per_class_rates(cm, classes)}
