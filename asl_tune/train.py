"""One configuration, start to finish: train DexNet, checkpoint every epoch, evaluate at the end.

The trainer knows nothing of Ray. It takes a TrialConfig, decoded arrays and an optional
`report(metrics, checkpoint_dir)` callback called once per epoch; `sweep` wraps it.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from asl_tune.config import TrialConfig, config_problems
from asl_tune.data import DecodedDataset, make_splits, subsample
from asl_tune.errors import AslTuneError
from asl_tune.evaluate import EVAL_BATCH, Batcher, confusion_matrix, measure_speed, pair_rates, per_class_rates, predict
from asl_tune.model import DexNet, count_parameters

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"  # the one before, kept for when the newest is torn or corrupt
GPU_RESIDENT_SHARE = 0.4  # keep the uint8 dataset on the GPU when it takes at most this share of its memory

Report = Callable[[dict, "Path | None"], None]


@dataclass
class TrialResult:
    """What one trial produced: its status, one row per epoch, the final metrics and the test confusion matrix."""

    status: str  # "completed" or "diverged"
    config: TrialConfig
    epochs: list[dict] = field(default_factory=list)  # per epoch: epoch, train_loss, ..., seconds
    final: dict = field(default_factory=dict)  # flat metrics: val/test/external accuracy, speed, pairs, ...
    classes: list[str] = field(default_factory=list)
    confusion: list[list[int]] | None = None  # (K, K) test counts, row = true class
    per_class: list[dict] = field(default_factory=list)  # precision, recall, fpr, fnr per class on test


def pick_device() -> torch.device:
    """The first visible GPU, else the CPU."""
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def device_name(device: torch.device) -> str:
    """"cpu", or the GPU's name (as trial rows record it)."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _save_checkpoint(folder: Path, state: dict) -> None:
    """Write atomically, keeping the previous checkpoint: a kill mid-write never loses the last good one."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{CHECKPOINT}.tmp{os.getpid()}"
    torch.save(state, tmp)
    if (folder / CHECKPOINT).exists():
        os.replace(folder / CHECKPOINT, folder / PREVIOUS)
    os.replace(tmp, folder / CHECKPOINT)


def load_checkpoint(folder: Path) -> dict | None:
    """The newest readable checkpoint in folder (falling back to the previous one), or None to start over."""
    for name in (CHECKPOINT, PREVIOUS):
        path = Path(folder) / name
        if not path.exists():
            continue
        try:
            # weights_only: a checkpoint is data, never code, whoever wrote it.
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            log.warning("checkpoint %s is unreadable (%s: %s); trying an older one", path, type(e).__name__, e)
    return None


@dataclass
class Trained:
    """A trained DexNet ready to classify: the network in eval mode, its class names, and the settings it was trained with."""

    model: nn.Module
    classes: list[str]
    config: TrialConfig
    source: str

    @torch.inference_mode()
    def classify(self, images: np.ndarray, device: torch.device | None = None) -> list[str]:
        """Class names for (N, S, S, 3) uint8 RGB images at S = config.image_size, normalised as in training."""
        images = np.asarray(images)
        size = self.config.image_size
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
            raise AslTuneError(f"images: must be a (N, {size}, {size}, 3) uint8 RGB array for {self.source}, got {images.dtype} {images.shape}")
        device = device or pick_device()
        model = self.model.to(device)
        batcher = Batcher(np.ascontiguousarray(images), device, channels_last=False)
        rows = torch.arange(len(images))
        preds = [model(batcher.batch(rows[s : s + EVAL_BATCH])).argmax(1).cpu() for s in range(0, len(rows), EVAL_BATCH)]
        return [self.classes[i] for i in torch.cat(preds).tolist()] if preds else []


def load_trained(where: str | Path) -> Trained:
    """The network a trial trained, from its checkpoint.pt, or the folder that holds one (a path, or a URI pyarrow opens).

    trials.parquet's `checkpoint` column names the folder of each trial's last checkpoint.
    """
    import io

    where = str(where)
    path = where if where.endswith(".pt") else f"{where.rstrip('/')}/{CHECKPOINT}"
    try:
        if "://" in path:
            from pyarrow import fs

            filesystem, inner = fs.FileSystem.from_uri(path)
            with filesystem.open_input_file(inner) as f:
                blob = io.BytesIO(f.read())
        else:
            blob = io.BytesIO(Path(path).read_bytes())
        state = torch.load(blob, map_location="cpu", weights_only=True)  # data, never code
    except Exception as e:  # missing, unreachable, torn, or not a torch file
        raise AslTuneError(f"{where}: not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict) or "config" not in state or "classes" not in state:
        raise AslTuneError(f"{where}: this checkpoint does not record its settings and classes (written before asl-tune saved them); retrain to load it")
    settings = dict(state["config"])
    settings.setdefault("split_seed", settings.get("seed", 0))  # written before the split had a seed of its own
    config = TrialConfig(**settings)
    model = DexNet(config.head_width, config.image_size, len(state["classes"]), config.dropout)
    model.load_state_dict(state["model"])
    return Trained(model.eval(), list(state["classes"]), config, where)


def _set_threads(threads: int | None) -> None:
    if threads:
        torch.set_num_threads(max(1, int(threads)))


def train_trial(
    config: TrialConfig,
    dataset: DecodedDataset,
    external: DecodedDataset | None = None,
    report: Report | None = None,
    checkpoint_dir: Path | None = None,
    resume_from: Path | None = None,
    threads: int | None = None,
    device: torch.device | None = None,
) -> TrialResult:
    """Train and evaluate one configuration; continue from resume_from's checkpoint when there is one."""
    problems = config_problems(asdict(config))
    if problems:
        raise AslTuneError("; ".join(f"{k}: {why}, got {v!r}" for k, why, v in problems))
    if dataset.image_size != config.image_size:
        raise AslTuneError(f"image_size: the dataset was decoded at {dataset.image_size} px but the config asks for {config.image_size}")
    _set_threads(threads)
    device = device or pick_device()
    on_gpu = device.type == "cuda"
    started = time.perf_counter()

    splits = make_splits(dataset.labels, dataset.frames, config.split, config.split_seed)
    train_rows = subsample(splits.train, dataset.labels, config.data_fraction, config.seed)
    if len(train_rows) == 0 or len(splits.val) == 0:
        raise AslTuneError(f"--data: too few images to split ({len(dataset.labels)}); each class needs at least 3")

    torch.manual_seed(config.seed)
    model = DexNet(config.head_width, config.image_size, len(dataset.classes), config.dropout).to(device)
    if on_gpu:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    batcher = Batcher(dataset.images, device, channels_last=on_gpu)
    if on_gpu and dataset.images.nbytes < GPU_RESIDENT_SHARE * torch.cuda.get_device_properties(device).total_memory:
        batcher.to_device()
    labels_t = torch.from_numpy(dataset.labels).to(device)

    history: list[dict] = []
    images_seen, train_compute_s, start_epoch = 0, 0.0, 0
    if resume_from is not None and (state := load_checkpoint(resume_from)) is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        history = [dict(zip(state["history_keys"], row)) for row in state["history"].tolist()]
        for row in history:
            row["epoch"] = int(row["epoch"])
            row["images_seen"] = int(row["images_seen"])
        start_epoch = int(state["epoch"]) + 1
        images_seen = int(state["images_seen"])
        train_compute_s = float(state["train_compute_s"])
        log.info("resumed at epoch %d of %d from %s", start_epoch + 1, config.epochs, resume_from)

    speed: dict = {}
    final: dict = {}
    status = "completed"
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(start_epoch, config.epochs):
        t0 = time.perf_counter()
        model.train()
        # The order of each epoch depends only on (seed, epoch), so a resumed trial sees the same batches.
        gen = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
        order = torch.from_numpy(train_rows)[torch.randperm(len(train_rows), generator=gen)]
        loss_sum, correct, seen = 0.0, 0, 0
        for s in range(0, len(order), config.batch_size):
            rows = order[s : s + config.batch_size]
            x, y = batcher.batch(rows), labels_t[rows.to(device)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                logits = model(x)
            loss = loss_fn(logits.float(), y)
            if not torch.isfinite(loss):
                status = "diverged"
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            loss_sum += float(loss.detach()) * len(rows)
            correct += int((logits.argmax(1) == y).sum())
            seen += len(rows)
        epoch_train_s = time.perf_counter() - t0
        images_seen += seen
        train_compute_s += epoch_train_s
        if status == "diverged":
            row = _epoch_row(epoch, float("nan"), float("nan"), float("nan"), float("nan"), seen / max(epoch_train_s, 1e-9), images_seen, time.perf_counter() - t0)
            history.append(row)
            final = {"val_accuracy": float("nan")}
            log.warning("loss became non-finite in epoch %d: trial diverged", epoch + 1)
            if report:
                report({**row, **_summary(status, history, images_seen, train_compute_s, started, device, model), **speed}, None)
            break

        val_pred, val_loss = predict(model, batcher, splits.val, dataset.labels, autocast=on_gpu)
        val_acc = float((val_pred == dataset.labels[splits.val]).mean())
        row = _epoch_row(epoch, loss_sum / seen, correct / seen, val_loss, val_acc, seen / epoch_train_s, images_seen, time.perf_counter() - t0)
        history.append(row)
        if not speed:  # the architecture decides speed, not the weights: measure once, report with every epoch
            speed = measure_speed(model, batcher, splits.val, autocast=on_gpu)
        last = epoch == config.epochs - 1
        result_extra: dict = {}
        if last:
            result_extra = _final_evaluation(model, batcher, dataset, splits.test, external, device, on_gpu)
            final = result_extra["metrics"]
        if checkpoint_dir is not None:
            _save_checkpoint(
                Path(checkpoint_dir),
                {
                    "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "rng": torch.get_rng_state(),
                    "epoch": epoch,
                    "images_seen": images_seen,
                    "train_compute_s": train_compute_s,
                    "history_keys": list(history[0].keys()),
                    "history": torch.tensor([list(r.values()) for r in history], dtype=torch.float64),
                    # enough to rebuild the network without the sweep: see load_trained
                    "config": asdict(config),
                    "classes": list(dataset.classes),
                },
            )
        if report:
            metrics = {**row, **speed, **_summary(status, history, images_seen, train_compute_s, started, device, model), **final}
            if last:
                metrics["confusion"] = result_extra["confusion"]
                metrics["per_class"] = result_extra["per_class"]
            report(metrics, Path(checkpoint_dir) if checkpoint_dir is not None else None)
        log.info("epoch %d/%d: loss %.4f, val accuracy %.4f, %.0f img/s", epoch + 1, config.epochs, row["train_loss"], val_acc, row["train_img_per_s"])

    if start_epoch >= config.epochs and history:
        # Restored from the final checkpoint (the process died after saving it, before the
        # report went out): evaluate again and send the last epoch's row with the final metrics.
        speed = measure_speed(model, batcher, splits.val, autocast=on_gpu)
        result_extra = _final_evaluation(model, batcher, dataset, splits.test, external, device, on_gpu)
        final = result_extra["metrics"]
        if report:
            metrics = {**history[-1], **speed, **_summary(status, history, images_seen, train_compute_s, started, device, model), **final}
            # No new checkpoint: the one restored from is already the final one.
            report({**metrics, "confusion": result_extra["confusion"], "per_class": result_extra["per_class"]}, None)

    summary = _summary(status, history, images_seen, train_compute_s, started, device, model)
    out = TrialResult(status=status, config=config, epochs=history, classes=list(dataset.classes))
    out.final = {**speed, **summary, **final}
    if status == "completed" and final:
        out.confusion = result_extra["confusion"]
        out.per_class = result_extra["per_class"]
    return out


def _epoch_row(epoch: int, train_loss: float, train_acc: float, val_loss: float, val_acc: float, img_per_s: float, images_seen: int, seconds: float) -> dict:
    return {
        "epoch": epoch + 1,  # 1-based, as users count epochs
        "train_loss": train_loss,
        "train_accuracy": train_acc,
        "val_loss": val_loss,
        "val_accuracy": val_acc,
        "train_img_per_s": img_per_s,
        "images_seen": images_seen,
        "seconds": seconds,
    }


def _summary(status: str, history: list[dict], images_seen: int, train_compute_s: float, started: float, device: torch.device, model: nn.Module) -> dict:
    finite = [r for r in history if math.isfinite(r["val_accuracy"])]
    return {
        "status": status,
        # A diverged trial has no accuracy to rank by: NaN tells the searcher the trial failed.
        "val_accuracy": finite[-1]["val_accuracy"] if finite and status != "diverged" else float("nan"),
        "epochs_completed": len(finite),
        "images_seen": images_seen,
        "train_img_per_s": images_seen / train_compute_s if train_compute_s > 0 else float("nan"),
        "train_seconds": time.perf_counter() - started,
        "n_parameters": count_parameters(model),
        "device": device_name(device),
        "hostname": platform.node(),
    }


def _final_evaluation(model: nn.Module, batcher: Batcher, dataset: DecodedDataset, test_rows: np.ndarray, external: DecodedDataset | None, device: torch.device, on_gpu: bool) -> dict:
    """Test accuracy, confusion matrix, per-class rates and pair rates; external accuracy when a set is attached."""
    k = len(dataset.classes)
    metrics: dict = {}
    if len(test_rows):
        pred, test_loss = predict(model, batcher, test_rows, dataset.labels, autocast=on_gpu)
        cm = confusion_matrix(dataset.labels[test_rows], pred, k)
        metrics.update(test_accuracy=float(np.trace(cm) / cm.sum()), test_loss=test_loss)
        metrics.update(pair_rates(cm, dataset.classes))
    else:
        cm = np.zeros((k, k), dtype=np.int64)
        metrics.update(test_accuracy=float("nan"), test_loss=float("nan"))
    metrics["external_accuracy"] = float("nan")
    if external is not None:
        ext_batcher = Batcher(external.images, device, channels_last=batcher.channels_last)
        rows = np.arange(len(external.labels))
        ext_pred, _ = predict(model, ext_batcher, rows, external.labels, autocast=on_gpu)
        metrics["external_accuracy"] = float((ext_pred == external.labels).mean())
    return {"metrics": metrics, "confusion": cm.tolist(), "per_class": per_class_rates(cm, dataset.classes)}
